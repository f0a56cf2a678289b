"""Importers for SGLang: expert distribution recorder dumps (``per_token``) and ``return_routed_experts``.

Formats (read from sglang ``srt/eplb/expert_distribution.py`` and ``srt/layers/moe/routed_experts_capturer.py``):

- ``--expert-distribution-recorder-mode per_token`` dumps, via ``/dump_expert_distribution_record``,
  ``torch.save(dict(records=[...], last_physical_to_logical_map=Tensor[L, P]))``. Each record is one
  forward pass: ``forward_pass_id``, ``rank``, ``input_ids`` and ``positions`` (lists, one per token),
  ``extend_seq_lens`` (tokens per request for extend/mixed passes, else None), ``forward_mode``
  (``ForwardMode`` value: 1 extend, 2 decode, 3 mixed, 4 idle) and ``topk_ids_of_layer``
  (int32 ``[L, tokens, 8]`` *physical* expert ids, -1 where unused, so columns past top-k are -1).
- ``return_routed_experts`` answers carry ``meta_info["routed_experts"]``: base64 of int32
  ``[prompt_tokens + completion_tokens - 1 - routed_experts_start_len, num_hidden_layers, top_k]``
  (the last sampled token is never fed back). Layers without experts stay 0 in the capture buffer.
  (Checked against the sglang 0.5.23 wheel as well.)

Invariant of the per_token importer: SGLang does not record request ids (``rids`` is an upstream
TODO), so sequences are rebuilt from positions and batch order. A decode row continues the open
sequence whose next position it has, preferring batch order (SGLang keeps running requests in order,
dropping finished ones and appending new ones); an extend segment continues a sequence only as a
chunked-prefill chunk, otherwise it starts a new sequence; in mixed passes one-token segments that
continue a sequence are decode steps. A sequence in decode that misses a decode or mixed pass has
finished and is closed. Ambiguous matches are counted and logged; a preempted request that SGLang
re-prefills becomes a new sequence.
"""

from __future__ import annotations

import base64
import logging
import pickle
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tiermem.errors import TraceError
from tiermem.predict.importers.rows import RowBuilder, blank_unrouted
from tiermem.predict.trace import DECODE, PREFILL, RouteTrace

logger = logging.getLogger("tiermem.predict")

EXTEND, DECODE_MODE, MIXED, IDLE = 1, 2, 3, 4


@dataclass
class _Open:
    """A sequence being rebuilt: its id, next position, and whether its last segment was a prefill."""

    seq: int
    next_pos: int
    in_prefill: bool
    used_in_pass: int = field(default=-1)


def load_sglang_per_token_dump(path: str | Path, *, model: str = "") -> RouteTrace:
    """Read one rank's ``expert_distribution_recorder_*.pt`` dump (``per_token`` mode)."""
    try:
        dump = torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TraceError(f"sglang importer: {str(path)!r} does not exist") from None
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:  # foreign or corrupt
        raise TraceError(f"sglang importer: {str(path)!r} is not a torch.save'd recorder dump: {exc}") from None
    return from_sglang_per_token(dump, model=model, source=f"sglang per_token dump {Path(path).name}")


def from_sglang_per_token(dump: Mapping[str, Any], *, model: str = "", source: str = "") -> RouteTrace:
    """Build a trace from the dict SGLang's per_token recorder dumps (see the module docstring)."""
    if not isinstance(dump, Mapping) or "records" not in dump or "last_physical_to_logical_map" not in dump:
        raise TraceError(
            "sglang importer: expected a dict with 'records' and 'last_physical_to_logical_map' (a dump of "
            "--expert-distribution-recorder-mode per_token); 'stat' mode dumps hold only counts"
        )
    mapping = np.asarray(dump["last_physical_to_logical_map"], dtype=np.int64)  # [L, P]
    records = sorted((r for r in dump["records"] if r["forward_mode"] != IDLE and len(r["input_ids"])),
                     key=lambda r: r["forward_pass_id"])
    if not records:
        raise TraceError("sglang importer: the dump holds no non-idle forward pass; record while serving requests")
    ranks = {r["rank"] for r in records}
    if len(ranks) > 1:
        raise TraceError(f"sglang importer: records of several ranks {sorted(ranks)}; import one rank's file")
    top_k = max(_used_columns(r["topk_ids_of_layer"]) for r in records)
    builder = RowBuilder(num_layers=mapping.shape[0], top_k=top_k)
    sequences: list[_Open] = []  # open sequences, oldest first
    created = [0]
    ambiguous = 0
    for index, record in enumerate(records):
        ids = np.asarray(record["topk_ids_of_layer"], dtype=np.int64)[:, :, :top_k].transpose(1, 0, 2)
        experts = np.where(ids >= 0, np.take_along_axis(mapping[None], np.maximum(ids, 0), axis=2), -1)
        positions = np.asarray(record["positions"], dtype=np.int64)
        tokens = np.asarray(record["input_ids"], dtype=np.int64)
        for start, length, decode in _segments(record):
            seq, was_ambiguous = _assign(sequences, created, int(positions[start]), length, decode, index)
            ambiguous += was_ambiguous
            rows = slice(start, start + length)
            builder.add(seq=np.full(length, seq.seq), pos=positions[rows], experts=experts[rows],
                        phase=np.full(length, DECODE if decode else PREFILL), token_ids=tokens[rows])
        if record["forward_mode"] in (DECODE_MODE, MIXED):
            # Every running request takes part in a decode or mixed pass; one that did not has finished.
            sequences[:] = [s for s in sequences if s.in_prefill or s.used_in_pass == index]
    if ambiguous:
        logger.warning("sglang importer: %d segments matched several open sequences; assigned by batch order",
                       ambiguous)
    num_experts = int(mapping.max()) + 1
    return builder.build(num_experts=num_experts, model=model, source=source or "sglang per_token dump")


def _used_columns(topk_ids: Any) -> int:
    used = (np.asarray(topk_ids) >= 0).any(axis=(0, 1))
    return int(np.flatnonzero(used).max()) + 1 if used.any() else 1


def _segments(record: Mapping[str, Any]) -> list[tuple[int, int, bool]]:
    """``(start, length, is_decode)`` per request in the pass."""
    mode, count = record["forward_mode"], len(record["input_ids"])
    if mode == DECODE_MODE:
        return [(i, 1, True) for i in range(count)]
    if mode not in (EXTEND, MIXED):
        raise TraceError(
            f"sglang importer: forward pass {record['forward_pass_id']} has forward_mode {mode}; only extend (1), "
            f"decode (2), mixed (3) and idle (4) passes are supported (disable speculative decoding to record)"
        )
    lengths = list(record["extend_seq_lens"] or [])
    if sum(lengths) != count:
        raise TraceError(
            f"sglang importer: forward pass {record['forward_pass_id']}: extend_seq_lens sum to {sum(lengths)} "
            f"but the pass has {count} tokens"
        )
    starts = np.r_[0, np.cumsum(lengths)[:-1]]
    return [(int(s), int(n), mode == MIXED and n == 1) for s, n in zip(starts, lengths) if n > 0]


def _assign(sequences: list[_Open], created: list[int], start_pos: int, length: int, decode: bool,
            pass_index: int) -> tuple[_Open, int]:
    """Find (or open) the sequence this segment continues; returns it and 1 if the match was ambiguous."""
    def fits(s: _Open) -> bool:
        return s.next_pos == start_pos and s.used_in_pass != pass_index and (decode or s.in_prefill)

    candidates = [s for s in sequences if fits(s)] if (decode or start_pos > 0) else []
    if candidates:
        chosen = candidates[0]
    else:
        if decode:
            logger.warning("sglang importer: decode row at position %d continues no open sequence; "
                           "starting a new one", start_pos)
        chosen = _Open(seq=created[0], next_pos=start_pos, in_prefill=True)
        created[0] += 1
        sequences.append(chosen)
    chosen.next_pos = start_pos + length
    chosen.in_prefill = not decode
    chosen.used_in_pass = pass_index
    return chosen, int(len(candidates) > 1)


def from_sglang_routed_experts(
    responses: Iterable[Mapping[str, Any]], *, num_layers: int, top_k: int, num_experts: int,
    model: str = "", moe_layers: Sequence[int] | None = None, start_len: int = 0,
) -> RouteTrace:
    """Build a trace from ``/generate`` answers (or ``Engine.generate`` results) with routed experts.

    Each answer becomes one sequence. ``num_layers`` is the model's ``num_hidden_layers`` and
    ``top_k`` its ``num_experts_per_tok`` (the payload is a flat array). Layers without experts
    (dense layers, zero-filled) are blanked to -1, as is any layer not in ``moe_layers`` when given;
    with top-1 routing a zero-filled layer cannot be told from expert 0, so pass ``moe_layers``.
    ``start_len`` is the ``routed_experts_start_len`` the requests were sent with (rows then start at
    that position).
    """
    builder = RowBuilder(num_layers=num_layers, top_k=top_k)
    for seq, response in enumerate(responses):
        meta = response.get("meta_info", {})
        if "routed_experts" not in meta or "prompt_tokens" not in meta:
            raise TraceError(
                f"sglang importer: answer {seq} lacks meta_info['routed_experts'] or ['prompt_tokens']; send "
                f"requests with return_routed_experts=True to a server started with --enable-return-routed-experts"
            )
        flat = np.frombuffer(base64.b64decode(meta["routed_experts"]), dtype=np.int32)
        prompt, completion = int(meta["prompt_tokens"]), int(meta.get("completion_tokens", 0))
        expected = prompt + completion - 1 - start_len
        if flat.size != expected * num_layers * top_k:
            raise TraceError(
                f"sglang importer: answer {seq} holds {flat.size} expert ids, expected (prompt {prompt} + completion "
                f"{completion} - 1 - start_len {start_len}) x {num_layers} layers x top-{top_k} = "
                f"{expected * num_layers * top_k}; check num_layers, top_k and start_len"
            )
        experts = blank_unrouted(flat.reshape(expected, num_layers, top_k), moe_layers)
        positions = np.arange(start_len, start_len + expected)
        output_ids = list(response.get("output_ids") or [])
        tokens = None
        if "input_ids" in response and len(output_ids) == completion:
            tokens = np.asarray((list(response["input_ids"]) + output_ids)[start_len:start_len + expected],
                                dtype=np.int64)
        builder.add(seq=np.full(expected, seq), pos=positions, experts=experts,
                    phase=np.where(positions < prompt, PREFILL, DECODE), token_ids=tokens)
    return builder.build(num_experts=num_experts, model=model, source="sglang return_routed_experts")
