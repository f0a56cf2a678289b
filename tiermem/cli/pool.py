"""``tiermem pool serve``: export objects held in this host's dram or cxl tier to authenticated peers.

Objects come from safetensors files whose tensor names are object keys (``kind:table:layer:index``,
as ``str(ObjectKey)`` writes them) and/or ``--synthetic COUNTxSIZE`` objects with known bytes (for
benches and tests). Peers attach with the ``rdma`` tier (``{"kind": "rdma", "address": ...}``). The
secret comes from ``--secret-file`` or an environment variable, never from the command line.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import struct
import threading
from dataclasses import replace
from pathlib import Path

import torch

from tiermem.config import format_bytes, parse_bytes
from tiermem.errors import ConfigError
from tiermem.manager import TierManager
from tiermem.rdma.server import PoolServer, PoolServerConfig
from tiermem.rdma.synthetic import fill_synthetic, synthetic_key
from tiermem.rdma.transport import SERVER_TRANSPORT, TransportKind
from tiermem.rdma.wire import DEFAULT_SECRET_ENV, load_secret
from tiermem.tiers.cxl import CxlBacking
from tiermem.types import ObjectKey

PAGE_BYTES = 4096  # objects start on their own page: a registration never shares a page with other data
POOL_TIER = "pool"
MAX_HEADER_BYTES = 100 << 20
_SYNTHETIC = re.compile(r"^\s*(\d+)\s*x\s*(\S+)\s*$")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("pool", help="serve objects to peers: the server side of the rdma tier",
                                   description=__doc__.split("\n\n")[0])
    actions = parser.add_subparsers(dest="pool_command", required=True, metavar="ACTION")
    serve = actions.add_parser(
        "serve", help="export objects until interrupted",
        description="Allocate a dram or cxl tier, load objects into it, register each object with the "
                    "transport and answer authenticated clients until SIGINT/SIGTERM.")
    serve.add_argument("--tier", choices=("dram", "cxl"), default="dram", help="tier kind holding the objects")
    serve.add_argument("--capacity", required=True, help="bytes of that tier, e.g. 1GiB")
    serve.add_argument("--numa-node", type=int, default=None, help="NUMA node of the tier (default: kernel's)")
    serve.add_argument("--cxl-backing", choices=[b.value for b in CxlBacking if b is not CxlBacking.DEVDAX],
                       default=CxlBacking.EMULATED.value, help="cxl only: a CPU-less NUMA node, or emulated")
    serve.add_argument("--listen", default="127.0.0.1:7450", help="host:port of the control channel (port 0: any)")
    serve.add_argument("--secret-file", help="file holding the shared secret (chmod 600)")
    serve.add_argument("--secret-env", default=DEFAULT_SECRET_ENV,
                       help=f"environment variable holding the secret when no file is given ({DEFAULT_SECRET_ENV})")
    serve.add_argument("--transport", choices=(TransportKind.NIXL.value, TransportKind.VERBS.value),
                       default=TransportKind.NIXL.value, help="transfer engine (nixl: UCX; verbs: raw ibverbs)")
    serve.add_argument("--writable", action="store_true", help="let clients write into the objects")
    serve.add_argument("--synthetic", metavar="COUNTxSIZE", help="also export COUNT synthetic objects of SIZE "
                       "bytes each (known bytes, for benches and tests), e.g. 16x64MiB")
    serve.add_argument("--safetensors", action="append", default=[], type=Path, metavar="FILE",
                       help="export every tensor of FILE; names must be object keys kind:table:layer:index")
    serve.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    secret = load_secret(args.secret_file, args.secret_env)
    synthetic = _parse_synthetic(args.synthetic) if args.synthetic else None
    if synthetic is None and not args.safetensors:
        raise ConfigError("tiermem pool serve: nothing to serve; give --safetensors FILE and/or "
                          "--synthetic COUNTxSIZE")
    spec = {"kind": args.tier, "name": POOL_TIER, "capacity_bytes": args.capacity, "numa_node": args.numa_node,
            "alignment_bytes": PAGE_BYTES, "register_cuda": "never"}
    if args.tier == "cxl":
        spec["backing"] = args.cxl_backing
    with TierManager.from_config({"tiers": [spec]}) as tm:
        objects: dict[ObjectKey, torch.Tensor] = {}
        for path in args.safetensors:
            load_safetensors(path, tm, objects)
        if synthetic is not None:
            count, nbytes = synthetic
            for index in range(count):
                tensor = tm.empty(nbytes, tier=POOL_TIER)
                fill_synthetic(tensor, index)
                objects[synthetic_key(index)] = tensor
        config = PoolServerConfig(listen=args.listen, writable=args.writable,
                                  transport=replace(SERVER_TRANSPORT, kind=TransportKind(args.transport)))
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        with PoolServer(config, secret, objects) as server:
            tier = tm.tier(POOL_TIER)
            label = " (emulated CXL)" if tier.emulated else ""
            print(f"tiermem pool: serving {len(objects)} objects ({format_bytes(server.exported_bytes)}) from "
                  f"tier {args.tier}{label} on {server.address} via {args.transport}"
                  f"{' (writable)' if args.writable else ' (read-only)'}; SIGINT/SIGTERM stops", flush=True)
            stop.wait()
    return 0


def _parse_synthetic(value: str) -> tuple[int, int]:
    match = _SYNTHETIC.match(value)
    if not match or int(match.group(1)) < 1:
        raise ConfigError(f"tiermem pool serve: --synthetic {value!r} is not COUNTxSIZE (e.g. 16x64MiB)")
    nbytes = parse_bytes(match.group(2), what="--synthetic size")
    if nbytes < 1:
        raise ConfigError("tiermem pool serve: --synthetic objects need at least 1 byte each")
    return int(match.group(1)), nbytes


def load_safetensors(path: Path, tm: TierManager, objects: dict[ObjectKey, torch.Tensor]) -> None:
    """Copy every tensor of a safetensors file into ``tm``'s pool tier, keyed by its name (an object key)."""
    try:
        with path.open("rb") as file:
            (header_bytes,) = struct.unpack("<Q", file.read(8))
            if header_bytes > MAX_HEADER_BYTES:
                raise ConfigError(f"tiermem pool serve: {path} has a {header_bytes}-byte header; not safetensors?")
            header = json.loads(file.read(header_bytes))
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                key = _parse_key(name, path)
                if key in objects:
                    raise ConfigError(f"tiermem pool serve: object {key} appears twice (again in {path})")
                begin, end = meta["data_offsets"]
                if end <= begin:
                    raise ConfigError(f"tiermem pool serve: tensor {name!r} in {path} is empty; the pool "
                                      "exports only objects of at least one byte")
                tensor = tm.empty(end - begin, tier=POOL_TIER)
                file.seek(8 + header_bytes + begin)
                if file.readinto(memoryview(tensor.numpy())[: end - begin]) != end - begin:
                    raise ConfigError(f"tiermem pool serve: {path} ends inside tensor {name!r}")
                objects[key] = tensor
    except ConfigError:
        raise
    except (OSError, struct.error, json.JSONDecodeError, KeyError, ValueError) as exc:
        raise ConfigError(f"tiermem pool serve: cannot read safetensors file {str(path)!r}: {exc}") from None


def _parse_key(name: str, path: Path) -> ObjectKey:
    kind, _, rest = name.partition(":")
    parts = rest.rsplit(":", 2)
    if not kind or len(parts) != 3 or not parts[1].lstrip("-").isdigit() or not parts[2].lstrip("-").isdigit():
        raise ConfigError(f"tiermem pool serve: tensor {name!r} in {path} is not named as an object key "
                          "kind:table:layer:index (e.g. expert:w13:3:17)")
    return ObjectKey(kind, parts[0], int(parts[1]), int(parts[2]))
