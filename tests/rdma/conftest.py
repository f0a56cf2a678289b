"""Fixtures for the RDMA pool tests: secrets, an in-process pool, and pool server processes.

A pool process runs the real CLI (``tiermem pool serve``) in a child interpreter; every wait on it
is bounded, and teardown terminates it (then kills it) so that no test can leave a server behind.
"""

from __future__ import annotations

import os
import secrets
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tiermem.rdma import PoolServer, PoolServerConfig, TransportConfig, TransportKind
from tiermem.rdma.synthetic import fill_synthetic, synthetic_key

SERVER_START_TIMEOUT_S = 90.0  # the child imports torch and NIXL; slow on a loaded 2-core CI box
SERVER_STOP_TIMEOUT_S = 10.0
INPROCESS_OBJECT_BYTES = (4096, 10_000, 65_536)

# Runs `tiermem pool serve ...` through the pool module itself, so the tests do not depend on how the
# top-level CLI wires its subcommands.
_LAUNCH = (
    "import argparse, logging, sys\n"
    "from tiermem.cli import pool\n"
    "parser = argparse.ArgumentParser(prog='tiermem')\n"
    "pool.add_parser(parser.add_subparsers(dest='command', required=True))\n"
    "args = parser.parse_args(sys.argv[1:])\n"
    "logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')\n"
    "sys.exit(args.func(args))\n"
)


@pytest.fixture
def secret() -> bytes:
    return secrets.token_hex(32).encode()


@pytest.fixture
def secret_file(tmp_path: Path, secret: bytes) -> Path:
    path = tmp_path / "pool.secret"
    path.write_bytes(secret + b"\n")
    path.chmod(0o600)
    return path


@dataclass
class InProcessPool:
    server: PoolServer
    objects: dict
    transport: TransportConfig


@pytest.fixture
def inprocess_pool(secret: bytes, manager):
    """A pool server in this process (inprocess transport) exporting objects of the dram tier."""
    objects = {}
    for index, nbytes in enumerate(INPROCESS_OBJECT_BYTES):
        tensor = manager.empty(nbytes, tier="dram")
        fill_synthetic(tensor, index)
        objects[synthetic_key(index)] = tensor
    transport = TransportConfig(kind=TransportKind.INPROCESS)
    with PoolServer(PoolServerConfig(transport=transport), secret, objects) as server:
        yield InProcessPool(server, objects, transport)


class PoolProcess:
    """A `tiermem pool serve` child process; ``address`` is known once it printed its ready line."""

    def __init__(self, secret_file: Path, log_path: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        command = [sys.executable, "-c", _LAUNCH, "pool", "serve", "--listen", "127.0.0.1:0",
                   "--secret-file", str(secret_file), *extra]
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self._log,
                                     env={**os.environ, **(env or {})})
        self.address = self._wait_ready()

    def _wait_ready(self) -> str:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        output = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.5)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                output += chunk
                for line in output.decode(errors="replace").splitlines():
                    if line.startswith("tiermem pool: serving"):
                        return line.split(" on ")[1].split()[0]
                if not chunk:
                    break
            if self.proc.poll() is not None:
                break
        self.stop()
        raise RuntimeError(f"pool process did not start within {SERVER_START_TIMEOUT_S} s: stdout={output!r}, "
                           f"log:\n{self.log_path.read_text(errors='replace')[-3000:]}")

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(SERVER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(SERVER_STOP_TIMEOUT_S)
        self.proc.stdout.close()
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def synthetic_tensor(index: int, nbytes: int) -> torch.Tensor:
    tensor = torch.empty(nbytes, dtype=torch.uint8)
    fill_synthetic(tensor, index)
    return tensor
