"""Loopback read bandwidth of the rdma tier (a benchmark script, not a test): prints one JSON line per size.

Starts `tiermem pool serve --synthetic 4x256MiB` as a child process and reads from it through NIXL
into host memory or HBM (``--device cuda``). Both processes run on this host, so every figure is a
loopback figure (UCX shared memory by default, TCP with ``--tls tcp``), never an RDMA figure.

    python tests/rdma/loopback_bench.py --tls default --device cpu
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rdma.conftest import PoolProcess  # noqa: E402  (the tests' pool-process helper)

from tiermem.rdma import PoolClient, PoolClientConfig, measure_read_bandwidth  # noqa: E402

SIZES_BYTES = ((4 << 10, 200), (64 << 10, 100), (1 << 20, 50), (16 << 20, 20), (256 << 20, 5), (1 << 30, 3))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tls", default="default", help="UCX_TLS for both processes ('default': UCX picks)")
    parser.add_argument("--device", default="cpu", help="where reads land: cpu or cuda")
    args = parser.parse_args()
    env = {} if args.tls == "default" else {"UCX_TLS": args.tls}
    os.environ.update(env)
    torch.empty(1, device=args.device)  # start CUDA (when asked) before UCX, so that UCX sees GPU memory
    with tempfile.TemporaryDirectory() as directory:
        secret = Path(directory) / "secret"
        secret.write_text(secrets.token_hex(32))
        secret.chmod(0o600)
        server = PoolProcess(secret, Path(directory) / "server.log", "--capacity", "1100MiB",
                             "--synthetic", "4x256MiB", env=env)
        client = PoolClient(PoolClientConfig(address=server.address, secret_file=str(secret),
                                             transfer_timeout_s=120))
        try:
            for nbytes, trials in SIZES_BYTES:
                destination = torch.empty(nbytes, dtype=torch.uint8, device=args.device)
                result = measure_read_bandwidth(client, nbytes, trials, destination=destination)
                result.pop("seconds")
                print(json.dumps({**result, "loadavg_1min": os.getloadavg()[0]}), flush=True)
        finally:
            client.close()
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
