"""The ``tiermem`` command: ``topo | bench | simulate | predictor ...``.

Each subcommand lives in its own module exposing ``add_parser(subparsers)``, which sets
``func=run`` on its parser; ``run(args) -> int`` is the exit code. A ``TierMemError`` is printed as one
clear line (exit 2), never as a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from tiermem.cli import bench, pool, predictor, simulate, topo
from tiermem.errors import TierMemError

SUBCOMMANDS = (topo, bench, simulate, predictor, pool)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tiermem", description="Tiered-memory offloading for LLM inference.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except TierMemError as exc:
        print(f"tiermem: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `tiermem topo --json | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
