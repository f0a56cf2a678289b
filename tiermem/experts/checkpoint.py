"""Expert weights read from safetensors checkpoints, by tensor naming scheme.

Recognised names (``{p}`` is any prefix ending in ``layers.{l}``, e.g. ``model.layers.3``):

| scheme        | models                                         | tensors per layer                              |
|---------------|------------------------------------------------|------------------------------------------------|
| ``per_expert``| Qwen2-MoE, Qwen3-MoE, DeepSeek-V2/V3, OLMoE    | ``{p}.mlp.experts.{e}.{gate,up,down}_proj.weight`` |
| ``mixtral``   | Mixtral (hub checkpoints)                      | ``{p}.block_sparse_moe.experts.{e}.{w1,w3,w2}.weight`` |
| ``fused``     | any model saved by transformers >= 5           | ``{p}.mlp.experts.gate_up_proj [E,2I,H]``, ``.down_proj [E,H,I]`` |

FP8 block scales (``weight_scale_inv`` next to a weight, or ``gate_up_proj_scale_inv``) are packed as
``{projection}_scale``. Invariants: every MoE layer has the same expert count and every expert every
tensor, or loading raises ``ConfigError`` naming the missing tensors; files are opened lazily and
read one expert at a time (a fused tensor through a slice), so a checkpoint is never loaded whole.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import torch
from safetensors import safe_open

from tiermem.errors import ConfigError
from tiermem.experts.layout import ExpertLayout

_LAYER = r"^(?P<prefix>(?:.+\.)?layers\.(?P<layer>\d+)\.(?P<block>mlp|block_sparse_moe))\.experts\."
_PER_EXPERT = re.compile(
    _LAYER + r"(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w2|w3)\.(?P<what>weight|weight_scale_inv)$"
)
_FUSED = re.compile(_LAYER + r"(?P<proj>gate_up_proj|down_proj)(?P<what>|_scale_inv)$")
_CANONICAL = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up", "w2": "down",
              "gate_up_proj": "gate_up"}
_PART_ORDER = ("gate_up", "gate", "up", "down")
SCHEMES_HELP = (
    "expected Qwen/DeepSeek/OLMoE names 'model.layers.{l}.mlp.experts.{e}.gate_proj.weight', Mixtral names "
    "'model.layers.{l}.block_sparse_moe.experts.{e}.w1.weight', or fused 'model.layers.{l}.mlp.experts.gate_up_proj'"
)


@dataclass(frozen=True)
class _Where:
    """Where one canonical tensor of one expert lives."""

    file: Path
    name: str
    index: int | None  # row of a fused [E, ...] tensor; None for a per-expert tensor


class CheckpointExperts:
    """An ``ExpertSource`` over the expert tensors of a safetensors checkpoint (file or directory)."""

    def __init__(self, path: str | Path, *, layers: Sequence[int] | None = None) -> None:
        self.path = Path(path)
        files = _safetensors_files(self.path)
        found, scheme = self._scan(files)
        if layers is not None:
            absent = sorted(set(layers) - set(found))
            if absent:
                raise ConfigError(
                    f"experts checkpoint {str(self.path)!r}: MoE layers {absent} have no expert tensors; "
                    f"layers with experts: {sorted(found)}"
                )
            found = {layer: found[layer] for layer in layers}
        self.scheme = scheme
        self.layers = tuple(sorted(found))
        self.num_experts = _check_complete(found, self.path)
        self._index = found
        self._handles: dict[Path, object] = {}
        first = self.tensors(self.layers[0], 0)
        self.layout = ExpertLayout.of(first)

    def tensors(self, layer: int, expert: int) -> Mapping[str, torch.Tensor]:
        parts = self._index[layer][expert]
        ordered = sorted(parts, key=_part_rank)
        return {part: self._read(parts[part]) for part in ordered}

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read(self, where: _Where) -> torch.Tensor:
        handle = self._handles.get(where.file)
        if handle is None:
            handle = self._handles[where.file] = safe_open(str(where.file), framework="pt")
        if where.index is None:
            return handle.get_tensor(where.name)
        return handle.get_slice(where.name)[where.index]

    def _scan(self, files: list[Path]) -> tuple[dict[int, dict[int, dict[str, _Where]]], str]:
        found: dict[int, dict[int, dict[str, _Where]]] = defaultdict(lambda: defaultdict(dict))
        schemes: set[str] = set()
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    match = _PER_EXPERT.match(name)
                    if match:
                        schemes.add("mixtral" if match["proj"].startswith("w") else "per_expert")
                        part = _CANONICAL[match["proj"]] + ("_scale" if match["what"] != "weight" else "")
                        found[int(match["layer"])][int(match["expert"])][part] = _Where(file, name, None)
                        continue
                    match = _FUSED.match(name)
                    if match:
                        schemes.add("fused")
                        part = _CANONICAL[match["proj"]] + ("_scale" if match["what"] else "")
                        for expert in range(handle.get_slice(name).get_shape()[0]):
                            found[int(match["layer"])][expert][part] = _Where(file, name, expert)
        if not found:
            raise ConfigError(
                f"experts checkpoint {str(self.path)!r}: no expert tensors among {len(files)} file(s); {SCHEMES_HELP}"
            )
        if len(schemes) > 1:
            raise ConfigError(
                f"experts checkpoint {str(self.path)!r} mixes naming schemes {sorted(schemes)}; one checkpoint must "
                "use one scheme"
            )
        return {layer: dict(experts) for layer, experts in found.items()}, schemes.pop()


def _safetensors_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if files:
            return files
        raise ConfigError(f"experts checkpoint: directory {str(path)!r} holds no *.safetensors file")
    raise ConfigError(f"experts checkpoint: {str(path)!r} does not exist")


def _check_complete(found: Mapping[int, Mapping[int, Mapping[str, _Where]]], path: Path) -> int:
    """The expert count shared by every layer; raises naming missing tensors."""
    num_experts = max(max(experts) for experts in found.values()) + 1
    parts = sorted({part for experts in found.values() for tensors in experts.values() for part in tensors},
                   key=_part_rank)
    missing = [
        f"layer {layer} expert {expert} {part}"
        for layer, experts in sorted(found.items())
        for expert in range(num_experts)
        for part in parts
        if part not in experts.get(expert, {})
    ]
    if missing:
        shown = "; ".join(missing[:8]) + ("" if len(missing) <= 8 else f"; ... ({len(missing)} in all)")
        raise ConfigError(
            f"experts checkpoint {str(path)!r}: missing tensors ({len(found)} MoE layers x {num_experts} experts, "
            f"each with {parts}): {shown}. The checkpoint is incomplete or a shard is missing from the directory"
        )
    return num_experts


def _part_rank(part: str) -> tuple[int, str]:
    base = part.removesuffix("_scale")
    return (_PART_ORDER.index(base) if base in _PART_ORDER else len(_PART_ORDER), part)
