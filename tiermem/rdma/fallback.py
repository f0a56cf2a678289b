"""``FallbackReader``: read each object from the first source that holds it; if that read fails, from the next.

Sources are tried in the order given (e.g. ``[rdma_tier, TensorSource("dram", ...)]``). A request goes
to the first source that holds its key; when that source's batch fails (``TransferError`` at submit or
at wait, including a per-attempt timeout), the failed requests go to the next source that holds each
key, and so on. A request that no remaining source holds fails the handle with every cause listed.

State of one request:
| state     | next                                                              |
|-----------|-------------------------------------------------------------------|
| pending   | its source's batch succeeds -> served (``served_by`` names it)   |
| pending   | the batch fails -> pending on the next source holding the key    |
| pending   | no further source holds the key -> the handle raises             |
A failed or overdue pool read is cancelled before its requests are retried, so no late byte lands over
the retry. A local copy (``TransferHandle``) cannot be cancelled: give ``attempt_timeout_s`` room for it,
or put local sources last.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Sequence

from tiermem.errors import ConfigError, TransferError
from tiermem.rdma.source import ObjectSource, ReadHandle, ReadRequest

log = logging.getLogger("tiermem.rdma")


@dataclass
class _Attempt:
    source: int
    requests: list[int]
    handle: ReadHandle
    deadline_s: float


class FallbackReader:
    """Reads objects from an ordered list of sources, falling back on failure."""

    def __init__(self, sources: Sequence[ObjectSource], *, attempt_timeout_s: float = 5.0) -> None:
        if not sources:
            raise ConfigError("FallbackReader: give at least one source")
        if attempt_timeout_s <= 0:
            raise ConfigError(f"FallbackReader: attempt_timeout_s must be > 0, got {attempt_timeout_s}")
        self.sources = list(sources)
        self.attempt_timeout_s = attempt_timeout_s

    def submit(self, requests: Sequence[ReadRequest]) -> "FallbackHandle":
        """Start reading every request from its first source; returns at once."""
        return FallbackHandle(self, list(requests))


class FallbackHandle:
    """Completion of a fallback read; ``served_by[i]`` names the source that served request ``i``."""

    def __init__(self, reader: FallbackReader, requests: list[ReadRequest]) -> None:
        self._reader = reader
        self._requests = requests
        self.served_by: list[str | None] = [None] * len(requests)
        self.failures: list[str] = []
        self._attempts: list[_Attempt] = []
        self._error: TransferError | None = None
        self._start(0, list(range(len(requests))))

    def done(self) -> bool:
        """True once every request was served or none can be (``wait`` then raises); never blocks.

        A failed or overdue batch is moved on to the next source here.
        """
        for attempt in list(self._attempts):
            if attempt.handle.done() or time.perf_counter() > attempt.deadline_s:
                self._settle(attempt, 0.0)
        return not self._attempts

    def wait(self, timeout_s: float | None = None) -> None:
        """Block until every request was served by some source; TransferError when none could."""
        deadline = None if timeout_s is None else time.perf_counter() + timeout_s
        while self._attempts:
            attempt = self._attempts[0]
            limit = attempt.deadline_s if deadline is None else min(attempt.deadline_s, deadline)
            self._settle(attempt, max(0.0, limit - time.perf_counter()))
            if deadline is not None and time.perf_counter() > deadline and self._attempts:
                raise TransferError(f"FallbackReader: {len(self._attempts)} batch(es) still unserved after "
                                    f"{timeout_s} s; failures so far: {self.failures}")
        if self._error is not None:
            raise self._error

    def _settle(self, attempt: _Attempt, timeout_s: float) -> None:
        source = self._reader.sources[attempt.source]
        try:
            attempt.handle.wait(timeout_s)
        except TransferError as exc:
            self._attempts.remove(attempt)
            self.failures.append(f"{source.name}: {exc}")
            log.warning("FallbackReader: %d read(s) from %s failed, trying the next source: %s",
                        len(attempt.requests), source.name, exc)
            try:
                self._start(attempt.source + 1, attempt.requests)
            except TransferError as final:
                self._error = self._error or final
            return
        self._attempts.remove(attempt)
        for index in attempt.requests:
            self.served_by[index] = source.name

    def _start(self, first_source: int, indices: list[int]) -> None:
        groups: dict[int, list[int]] = {}
        for index in indices:
            key = self._requests[index].key
            position = next((p for p in range(first_source, len(self._reader.sources))
                             if self._reader.sources[p].holds(key)), None)
            if position is None:
                tried = [s.name for s in self._reader.sources]
                raise TransferError(f"FallbackReader: no source left for object {key} (sources {tried}); "
                                    f"failures: {self.failures or ['none of them holds it']}")
            groups.setdefault(position, []).append(index)
        for position, group in sorted(groups.items()):
            source = self._reader.sources[position]
            try:
                handle = source.submit([self._requests[i] for i in group])
            except TransferError as exc:
                self.failures.append(f"{source.name}: {exc}")
                log.warning("FallbackReader: %s refused %d read(s), trying the next source: %s",
                            source.name, len(group), exc)
                self._start(position + 1, group)
                continue
            self._attempts.append(_Attempt(position, group, handle,
                                           time.perf_counter() + self._reader.attempt_timeout_s))
