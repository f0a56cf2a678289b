"""Imports flow one way: no module imports a module of a higher layer (and so there are no cycles)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tiermem"

LAYERS = {
    "types": 0, "errors": 0, "config": 0, "registry": 0,
    "numa": 1, "sysfs": 1, "topology": 1, "topology_render": 1, "defaults": 1,
    "tiers": 2, "residency": 2, "predict": 2, "rdma": 2,
    "transfer": 3,
    "manager": 4,
    "prefetch": 5, "experts": 5, "engram": 5, "simulate": 5, "repair": 5, "placement": 5,
    "bench": 6, "cli": 6, "__main__": 6,
}


def _top(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "tiermem" and len(parts) > 1 else None


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if node.module == "tiermem")
    return found


def test_every_package_has_a_layer():
    tops = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
            if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists())}
    assert tops <= set(LAYERS), f"assign a layer in tests/test_layers.py to: {sorted(tops - set(LAYERS))}"


def test_imports_only_flow_downward():
    violations = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.name == "__init__.py" and len(rel.parts) == 1:
            continue  # the package root re-exports the public API
        own = LAYERS[rel.parts[0].removesuffix(".py")]
        for module in _imports(path):
            top = _top(module)
            if top is not None and top in LAYERS and LAYERS[top] > own:
                violations.append(f"{rel} (layer {own}) imports {module} (layer {LAYERS[top]})")
    assert not violations, "\n".join(violations)


def test_import_tiermem_needs_no_gpu_and_no_optional_package():
    optional = ("sglang", "nixl", "cupy", "triton", "transformers")
    code = f"import sys, tiermem; print([m for m in {optional!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
