"""`tiermem pool serve`: argument checks and loading objects from safetensors files."""

from __future__ import annotations

import argparse
import json
import struct

import pytest
import torch

from tiermem.cli import pool
from tiermem.errors import ConfigError
from tiermem.manager import TierManager
from tiermem.types import ObjectKey

EXPERT = ObjectKey("expert", "w13", 3, 17)
ENGRAM = ObjectKey("engram", "layer:2", 2, 0)  # a table name with a colon still parses
POOL_BYTES = 1 << 20


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tiermem")
    pool.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["pool", "serve", *argv])


def write_safetensors(path, tensors: dict[str, torch.Tensor]) -> None:
    header, offset, blobs = {"__metadata__": {"format": "pt"}}, 0, []
    for name, tensor in tensors.items():
        blob = tensor.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()
        header[name] = {"dtype": "U8", "shape": [len(blob)], "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs))


@pytest.fixture
def pool_manager():
    with TierManager.from_config({"tiers": [{"kind": "dram", "name": pool.POOL_TIER, "capacity_bytes": POOL_BYTES,
                                             "alignment_bytes": pool.PAGE_BYTES, "arena_bytes": POOL_BYTES,
                                             "register_cuda": "never"}]}) as tm:
        yield tm


def test_serve_needs_something_to_serve(secret_file):
    with pytest.raises(ConfigError, match="nothing to serve"):
        pool.run(parse("--capacity", "1MiB", "--secret-file", str(secret_file)))


def test_serve_refuses_a_missing_secret_before_allocating(monkeypatch):
    monkeypatch.delenv("TIERMEM_POOL_SECRET", raising=False)
    with pytest.raises(ConfigError, match="no secret"):
        pool.run(parse("--capacity", "1MiB", "--synthetic", "1x4KiB"))


@pytest.mark.parametrize("value", ["4", "0x4KiB", "2xlots", "x4KiB"])
def test_malformed_synthetic_spec_is_refused(secret_file, value):
    with pytest.raises(ConfigError, match="synthetic"):
        pool.run(parse("--capacity", "1MiB", "--secret-file", str(secret_file), "--synthetic", value))


def test_safetensors_objects_are_loaded_bit_exact_onto_page_aligned_tier_memory(tmp_path, pool_manager):
    expert = torch.randn(3, 5, dtype=torch.float32)
    engram = torch.arange(1000, dtype=torch.int16)
    path = tmp_path / "objects.safetensors"
    write_safetensors(path, {str(EXPERT): expert, str(ENGRAM): engram})
    objects: dict[ObjectKey, torch.Tensor] = {}
    pool.load_safetensors(path, pool_manager, objects)
    assert sorted(objects) == sorted([EXPERT, ENGRAM])
    assert torch.equal(objects[EXPERT].view(torch.float32).reshape(3, 5), expert)
    assert torch.equal(objects[ENGRAM].view(torch.int16), engram)
    assert all(t.data_ptr() % pool.PAGE_BYTES == 0 for t in objects.values())
    assert pool_manager.tier_of(objects[EXPERT]).name == pool.POOL_TIER


def test_safetensors_names_must_be_object_keys_and_unique(tmp_path, pool_manager):
    bad = tmp_path / "bad.safetensors"
    write_safetensors(bad, {"model.layers.0.mlp.experts.3.w1": torch.zeros(4)})
    with pytest.raises(ConfigError, match="kind:table:layer:index"):
        pool.load_safetensors(bad, pool_manager, {})
    good = tmp_path / "good.safetensors"
    write_safetensors(good, {str(EXPERT): torch.zeros(4)})
    objects: dict[ObjectKey, torch.Tensor] = {}
    pool.load_safetensors(good, pool_manager, objects)
    with pytest.raises(ConfigError, match="appears twice"):
        pool.load_safetensors(good, pool_manager, objects)


def test_truncated_safetensors_file_is_refused(tmp_path, pool_manager):
    path = tmp_path / "short.safetensors"
    write_safetensors(path, {str(EXPERT): torch.zeros(64)})
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ConfigError, match="ends inside tensor"):
        pool.load_safetensors(path, pool_manager, {})
