"""Readers for sysfs-style trees: id lists, optional files, natural-order children, VM evidence.

Invariant: every reader takes paths under a caller-given root and runs no subprocess, so fixture trees
describe hosts exactly. ``parse_each`` turns a malformed item into a logged skip, never a crash.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

logger = logging.getLogger("tiermem.topology")

T = TypeVar("T")

_VM_SIGNATURES = (
    "qemu", "kvm", "firecracker", "vmware", "xen", "virtualbox", "bochs", "amazon ec2",
    "google compute engine", "openstack", "parallels", "cloud hypervisor", "virtual machine",
)
_PARAVIRT_CLOCKSOURCES = {"kvm-clock": "KVM", "xen": "Xen", "hyperv_clocksource_tsc_page": "Hyper-V"}


@dataclass(frozen=True)
class VmGuess:
    """Best-effort guess whether the host is a virtual machine; ``evidence`` says what it rests on."""

    is_vm: bool
    evidence: str


def parse_id_list(text: str) -> tuple[int, ...]:
    """Parse a kernel id list such as ``"0-3,8,10-11"`` (empty means none) into sorted ids."""
    ids: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        first, sep, last = part.partition("-")
        low, high = int(first), int(last) if sep else int(first)
        if low < 0 or high < low:
            raise ValueError(f"bad range {part!r} in id list {text.strip()!r}")
        ids.update(range(low, high + 1))
    return tuple(sorted(ids))


def guess_vm(root: Path) -> VmGuess:
    try:
        return _vm_evidence(root)
    except (OSError, ValueError) as exc:
        logger.warning("topology: cannot tell whether the host is a VM (%s: %s)", type(exc).__name__, exc)
        return VmGuess(False, f"unreadable VM evidence ({exc})")


def _vm_evidence(root: Path) -> VmGuess:
    hypervisor = read_optional(root / "hypervisor/type", str.strip)
    if hypervisor:
        return VmGuess(True, f"hypervisor/type {hypervisor!r}")
    dmi = {name: read_optional(root / "class/dmi/id" / name, str.strip) or ""
           for name in ("sys_vendor", "product_name")}
    if ".metal" in dmi["product_name"]:  # EC2 bare metal ("c5.metal", "m7i.metal-48xl") says "Amazon EC2" too
        return VmGuess(False, f"DMI product_name {dmi['product_name']!r} names a bare-metal instance")
    for name, value in dmi.items():
        if any(signature in value.lower() for signature in _VM_SIGNATURES):
            return VmGuess(True, f"DMI {name} {value!r}")
    clocks = read_optional(root / "devices/system/clocksource/clocksource0/available_clocksource", str.split)
    for clock in clocks or ():
        if clock in _PARAVIRT_CLOCKSOURCES:
            return VmGuess(True, f"{_PARAVIRT_CLOCKSOURCES[clock]} paravirtual clocksource {clock!r}")
    return VmGuess(False, "no hypervisor signature in DMI, hypervisor/type or clocksource")


def parse_each(paths: Iterable[Path], what: str, parse: Callable[[Path], T | None]) -> tuple[T, ...]:
    """Parse every path; a malformed one is skipped with a warning, a ``None`` result silently."""
    items = []
    for path in paths:
        try:
            item = parse(path)
        except (OSError, ValueError, KeyError) as exc:  # UnicodeDecodeError is a ValueError
            logger.warning("topology: skipping %s %s: malformed sysfs data (%s: %s)",
                           what, path, type(exc).__name__, exc)
            continue
        if item is not None:
            items.append(item)
    return tuple(items)


def children(directory: Path, pattern: str) -> list[Path]:
    """Entries of ``directory`` whose whole name matches ``pattern``, in natural order; [] if absent."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if re.fullmatch(pattern, p.name)]
    return sorted(found, key=lambda p: [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", p.name)])


def trailing_index(path: Path) -> int:
    return int(re.search(r"(\d+)$", path.name).group(1))


def read_optional(path: Path, parse: Callable[[str], T]) -> T | None:
    return parse(path.read_text()) if path.is_file() else None


def node_or_none(text: str) -> int | None:
    node = int(text)
    return None if node < 0 else node
