"""Rewrite a wheel without the members a run never loads, so the GPU machine's 64 MiB carry can hold it.

The members to drop are named by glob patterns on their archive paths; the wheel's RECORD loses their
lines, so pip installs the rest as a consistent distribution. Every pattern must match at least one
member (a pattern that matches nothing means the wheel is not the one the patterns were written for).

    python strip_wheel.py WHEEL PATTERN [PATTERN ...]      # rewrites WHEEL in place
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import sys
import tempfile
import zipfile
from pathlib import Path


def strip(wheel: Path, patterns: list[str]) -> tuple[int, int]:
    """Drop the members matching ``patterns`` from ``wheel``; return (members dropped, bytes saved on disk)."""
    before = wheel.stat().st_size
    with zipfile.ZipFile(wheel) as source:
        names = source.namelist()
        unmatched = [p for p in patterns if not any(fnmatch.fnmatch(n, p) for n in names)]
        if unmatched:
            raise SystemExit(f"strip_wheel: {wheel.name}: no member matches {unmatched}; check the wheel version")
        dropped = {n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns)}
        records = [n for n in names if n.endswith(".dist-info/RECORD")]
        if len(records) != 1:
            raise SystemExit(f"strip_wheel: {wheel.name}: expected one RECORD, found {records}")
        fd, tmp = tempfile.mkstemp(suffix=".whl", dir=wheel.parent)
        os.close(fd)
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as target:
            for info in source.infolist():
                if info.filename in dropped:
                    continue
                data = source.read(info)
                if info.filename == records[0]:
                    lines = data.decode().splitlines(keepends=True)
                    data = "".join(line for line in lines if line.split(",", 1)[0] not in dropped).encode()
                target.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    os.replace(tmp, wheel)
    return len(dropped), before - wheel.stat().st_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", type=Path)
    parser.add_argument("patterns", nargs="+")
    args = parser.parse_args(argv)
    count, saved = strip(args.wheel, args.patterns)
    print(f"{args.wheel.name}: dropped {count} members, {saved / 2**20:.1f} MiB smaller "
          f"({args.wheel.stat().st_size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
