"""Build the MoE language model's corpus: real offline text from this machine, a byte-level BPE, token ids.

Runs on the CPU machine only: it reads Debian documentation, English man pages and Python sources
installed here, and it imports ``tokenizers``. The GPU machine has neither, so it only ever reads the
result (``data.load_corpus``).

Invariants:
- Deterministic on a given machine: every source lists its files in sorted order, then visits them in
  a fixed pseudo-random order keyed by the SHA-1 of the relative path (so a byte quota samples the
  whole tree, not its first letters); the tokenizer is trained on the selected documents in order.
- A document is one file: decompressed (``.gz``), decoded as UTF-8 (invalid bytes replaced), cut at
  ``max_doc_bytes``; files that hold NUL bytes, are shorter than ``min_doc_bytes`` or repeat an earlier
  document's text exactly are skipped.
- Output (``.moe_lm/`` at the repository root, git-ignored): ``tokens.npy`` (uint16, every document
  followed by the end-of-text id), ``doc_offsets.npy`` (int64 ``[D + 1]``: document ``i`` is
  ``tokens[offsets[i]:offsets[i + 1]]``), ``tokenizer.json``, ``docs.tsv`` (provenance per document)
  and ``manifest.json`` (settings, per-source counts, vocabulary size, end-of-text id, SHA-256 of the
  tokens).

Usage, from the repository root: ``python -m bench.moe_lm.corpus`` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tokenizers import ByteLevelBPETokenizer

from bench.moe_lm.data import CORPUS_DIR, EOS_TOKEN, MANIFEST_FORMAT

logger = logging.getLogger("tiermem.bench.moe_lm")

SITE_PACKAGES = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


@dataclass(frozen=True)
class Source:
    """One kind of text: files under ``root`` matching ``patterns``, up to ``quota_bytes`` of text."""

    name: str
    root: Path
    patterns: tuple[str, ...]
    quota_bytes: int
    group_quota_bytes: int = 0  # cap per top-level folder under root (0 = none), so no package dominates
    skip_dirs: tuple[str, ...] = ()  # top-level folders under root to leave out
    skip_names: tuple[str, ...] = ()  # file names to leave out (licence boilerplate)


SOURCES = (
    Source("python-docs", Path("/usr/share/doc/python3.11-doc/html/_sources"), ("**/*.txt",), 12_000_000),
    Source("man-pages", Path("/usr/share/man"), tuple(f"man{n}/*.gz" for n in range(1, 9)), 14_000_000),
    Source("debian-docs", Path("/usr/share/doc"), ("**/*.gz", "**/*.txt", "**/README*", "**/NEWS*", "**/changelog*"),
           8_000_000, group_quota_bytes=400_000, skip_dirs=("python3.11-doc",), skip_names=("copyright",)),
    Source("python-sources", SITE_PACKAGES, ("**/*.py",), 12_000_000, group_quota_bytes=1_000_000),
)


@dataclass(frozen=True)
class Settings:
    """How documents are cut and how the tokenizer is trained."""

    vocab_size: int = 8192
    min_frequency: int = 2
    min_doc_bytes: int = 256
    max_doc_bytes: int = 128_000


@dataclass(frozen=True)
class Document:
    source: str
    path: str
    text: str


def candidate_files(source: Source) -> list[Path]:
    """The files of ``source`` in its fixed visiting order (sorted, then keyed by SHA-1 of the path)."""
    found = {p for pattern in source.patterns for p in source.root.glob(pattern)}
    files = [p for p in sorted(found)
             if p.is_file() and not p.is_symlink() and p.name not in source.skip_names
             and p.relative_to(source.root).parts[0] not in source.skip_dirs]
    return sorted(files, key=lambda p: hashlib.sha1(str(p.relative_to(source.root)).encode()).hexdigest())


def read_text(path: Path, settings: Settings) -> str | None:
    """The document text of ``path``, or None when it is unreadable, binary or too short."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    if b"\0" in raw or len(raw) < settings.min_doc_bytes:
        return None
    return raw[:settings.max_doc_bytes].decode("utf-8", errors="replace")


def collect(sources: tuple[Source, ...], settings: Settings) -> list[Document]:
    """Every selected document, source by source, each source filled up to its quota."""
    seen: set[bytes] = set()
    documents = []
    for source in sources:
        total, per_group = 0, {}
        for path in candidate_files(source):
            group = path.relative_to(source.root).parts[0]
            if source.group_quota_bytes and per_group.get(group, 0) >= source.group_quota_bytes:
                continue
            text = read_text(path, settings)
            if text is None:
                continue
            digest = hashlib.sha256(text.encode()).digest()
            if digest in seen:
                continue
            seen.add(digest)
            documents.append(Document(source.name, str(path), text))
            size = len(text.encode())
            total += size
            per_group[group] = per_group.get(group, 0) + size
            if total >= source.quota_bytes:
                break
        logger.info("corpus: %-15s %6d documents, %5.1f MB of text", source.name,
                    sum(d.source == source.name for d in documents), total / 1e6)
    return documents


def tokenize(documents: list[Document], settings: Settings) -> tuple[ByteLevelBPETokenizer, np.ndarray, np.ndarray]:
    """Train the byte-level BPE on ``documents``; return it, the uint16 tokens and the document offsets."""
    tokenizer = ByteLevelBPETokenizer()
    tokenizer.train_from_iterator((d.text for d in documents), vocab_size=settings.vocab_size,
                                  min_frequency=settings.min_frequency, special_tokens=[EOS_TOKEN],
                                  show_progress=False)
    eos = tokenizer.token_to_id(EOS_TOKEN)
    encoded = tokenizer.encode_batch([d.text for d in documents])
    lengths = np.array([len(e.ids) + 1 for e in encoded], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens = np.empty(int(offsets[-1]), dtype=np.uint16)
    for start, item in zip(offsets[:-1], encoded):
        tokens[start:start + len(item.ids)] = item.ids
        tokens[start + len(item.ids)] = eos
    return tokenizer, tokens, offsets


def build(out: Path, sources: tuple[Source, ...] = SOURCES, settings: Settings = Settings()) -> dict:
    """Collect, tokenize and write the corpus into ``out``; return the manifest."""
    documents = collect(sources, settings)
    tokenizer, tokens, offsets = tokenize(documents, settings)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "tokens.npy", tokens)
    np.save(out / "doc_offsets.npy", offsets)
    tokenizer.save(str(out / "tokenizer.json"))
    lengths = np.diff(offsets)
    rows = (f"{index}\t{doc.source}\t{length}\t{doc.path}\n"
            for index, (doc, length) in enumerate(zip(documents, lengths)))
    (out / "docs.tsv").write_text("doc\tsource\ttokens\tpath\n" + "".join(rows))
    text_bytes = {s.name: sum(len(d.text.encode()) for d in documents if d.source == s.name) for s in sources}
    manifest = {
        "format": MANIFEST_FORMAT, "vocab_size": tokenizer.get_vocab_size(), "eos_id": tokenizer.token_to_id(EOS_TOKEN),
        "num_docs": len(documents), "num_tokens": int(tokens.size), "text_bytes": sum(text_bytes.values()),
        "bytes_per_token": sum(text_bytes.values()) / tokens.size,
        "tokens_sha256": hashlib.sha256(tokens.tobytes()).hexdigest(),
        "settings": asdict(settings),
        "sources": [{"name": s.name, "root": str(s.root), "patterns": list(s.patterns), "quota_bytes": s.quota_bytes,
                     "group_quota_bytes": s.group_quota_bytes, "text_bytes": text_bytes[s.name],
                     "documents": sum(d.source == s.name for d in documents)} for s in sources],
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=CORPUS_DIR, help=f"output folder (default {CORPUS_DIR}/)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    manifest = build(args.out)
    sizes = {p.name: p.stat().st_size for p in sorted(args.out.iterdir()) if p.is_file()}
    logger.info("corpus: %d documents, %.1f MB of text, %d tokens (%.2f bytes/token), vocabulary %d",
                manifest["num_docs"], manifest["text_bytes"] / 1e6, manifest["num_tokens"],
                manifest["bytes_per_token"], manifest["vocab_size"])
    listing = ", ".join(f"{name} {size / 2**20:.1f} MiB" for name, size in sizes.items())
    logger.info("corpus: wrote %s: %s; %.1f MiB in all", args.out, listing, sum(sizes.values()) / 2**20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
