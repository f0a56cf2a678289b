"""``tiermem topo``: show what this host offers for tiered memory, as tables or as JSON (``--json``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console

from tiermem.topology import discover
from tiermem.topology_render import render


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "topo",
        help="show NUMA nodes, memory tiers, GPUs and CXL/dax/RDMA devices of this host",
        description="Read this host's memory topology from sysfs (no subprocess, no nvidia-smi) and show "
                    "NUMA nodes with CPUs, memory and distances, Linux memory tiers, GPUs with their NUMA "
                    "affinity and PCIe link, and CXL, devdax and RDMA devices.",
    )
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")
    parser.add_argument("--sysfs-root", type=Path, default=Path("/sys"),
                        help="where sysfs is mounted (default: /sys); a copied tree describes another host")
    parser.add_argument("--dev-root", type=Path, default=Path("/dev"),
                        help="where device nodes live, to tell whether daxX.Y exists (default: /dev)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the topology; a missing sysfs root raises TopologyError, which ``main`` reports in one line."""
    topology = discover(args.sysfs_root, args.dev_root)
    if args.json:
        print(json.dumps(topology.to_dict(), indent=2))
    else:
        Console().print(render(topology))
    return 0
