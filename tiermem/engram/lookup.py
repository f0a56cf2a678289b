"""The prefetching Engram lookup: token ids in, one handle per Engram layer out, rows gathered meanwhile.

A step calls ``submit(token_ids)`` as soon as its tokens are known; each Engram layer later calls
``handles[layer_id].wait()``, which makes the current stream wait for that layer's rows only.
How rows move depends on where the table lives (``GatherMethod``, chosen per layer):

| method   | table                 | indices hashed on | rows move by                                     |
|----------|-----------------------|-------------------|--------------------------------------------------|
| resident | on the compute device | GPU (side stream) | one fused hash + gather kernel per layer         |
| uva      | pinned host memory    | GPU (side stream) | one fused hash + gather kernel per layer, which  |
|          |                       |                   | reads host rows (no de-duplication)              |
| staged   | pinned host memory    | CPU (worker)      | CPU gather into pinned staging (de-duplicated)   |
|          |                       |                   | + one copy to the device                         |

A layer's optional hot-row cache (HBM copies of its most frequent rows) is probed inside the
fused kernel, so only misses cross the link; on the other paths ``plan_fetch`` takes hits out of
the de-duplicated rows. The fused kernel needs Triton; without it (or with
``fuse_hash_gather=False``) GPU layers hash with torch, and uva layers de-duplicate the batch (a
sort) before a gather kernel. De-duplication only saves link bytes when a batch repeats rows,
which decode batches rarely do (distinct rows per step ~= requested rows on random and real text
alike), and it costs ~10 small kernels per layer. GPU gathers run on at most ``gather_max_programs`` CTAs.

Concurrency: GPU work goes on one side stream that first waits for the submitting stream; every
layer records its own event. Staged layers run in one named worker thread, in layer order; a
staging slot is reused only after the copy that last read it completed (``ready`` event), so a
submit may block on the host only when ``staging_slots`` submits are still in flight. Staged layers
hash on the host, so pass host token ids (the scheduler has them; a device tensor is copied to the
host, which waits for the submitting stream). The resident and uva paths never sync with the host
and can be captured in a CUDA graph; the staged path cannot. On a host without CUDA, the same code
runs synchronously (host table -> host rows, de-duplicated), so CPU tests exercise it. Outputs are allocated on the submitting stream before the fork; a handle must be waited before
it is dropped, or the submitting stream may reuse its rows while the side stream still writes them.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

import torch

from tiermem.config import option, require
from tiermem.engram.cache import HotRowCache
from tiermem.engram.gather import hash_gather, staged_gather, uva_available, uva_gather
from tiermem.engram.handle import LayerLookupStats, LookupHandle, resolved
from tiermem.engram.hashing import NgramHasher
from tiermem.engram.plan import FetchPlan, plan_fetch
from tiermem.engram.table import EngramTable, RowFormat, decode_rows
from tiermem.errors import CapacityError, ConfigError, TransferError

logger = logging.getLogger("tiermem.engram")


class GatherMethod(str, enum.Enum):
    """How a layer's rows reach the compute device (see the module docstring's table)."""

    AUTO = "auto"
    RESIDENT = "resident"
    UVA = "uva"
    STAGED = "staged"


class StreamPriority(str, enum.Enum):
    """CUDA priority of the lookup's side stream (kept by CUDA graphs captured from it)."""

    NORMAL = "normal"
    HIGH = "high"  # its kernels' blocks are scheduled ahead of queued normal-priority blocks


@dataclass(frozen=True)
class EngramLookupConfig:
    """Knobs of the lookup path; the defaults follow the H100 measurements in FACTS.md."""

    method: GatherMethod = option(GatherMethod.AUTO, help="gather method for every host-tier layer; auto "
                                                          "picks uva for big rows, staged for small ones")
    uva_min_row_bytes: int = option(512, help="auto uses the UVA kernel for rows of at least this many bytes")
    max_tokens_per_submit: int = option(8192, help="largest batch x positions one submit may carry (sizes the "
                                                   "pinned staging buffers)")
    staging_slots: int = option(2, help="pinned staging buffers per staged layer (submits in flight)")
    fuse_hash_gather: bool = option(True, help="on the GPU, hash and gather each layer in one Triton kernel (no "
                                               "de-duplication); false: torch hashing, sort-based de-duplication "
                                               "for uva layers, then the gather kernel")
    gather_max_programs: int = option(16, help="most CTAs a GPU gather kernel occupies; a host-memory gather is "
                                               "bound by link latency, so a few CTAs keep enough reads in flight "
                                               "and leave the other SMs to the model")
    side_stream_priority: StreamPriority = option(StreamPriority.NORMAL, help="CUDA priority of the side stream "
                                                                              "that runs GPU hashing and gathers")

    def __post_init__(self) -> None:
        require(self.uva_min_row_bytes >= 1, self, f"uva_min_row_bytes must be >= 1, got {self.uva_min_row_bytes}")
        require(self.max_tokens_per_submit >= 1, self,
                f"max_tokens_per_submit must be >= 1, got {self.max_tokens_per_submit}")
        require(self.staging_slots >= 1, self, f"staging_slots must be >= 1, got {self.staging_slots}")
        require(self.gather_max_programs >= 1, self,
                f"gather_max_programs must be >= 1, got {self.gather_max_programs}")


@dataclass
class _StagingSlot:
    rows: torch.Tensor  # pinned uint8 [max_rows, row_bytes]
    plan: torch.Tensor  # pinned int64 [3 * max_rows]: request ranks, hits, slots of one submit, packed
    ready: torch.cuda.Event  # recorded after the copies that read this slot


class EngramLookup:
    """Gathers every Engram layer's rows for a step's tokens; one handle per layer."""

    def __init__(self, hasher: NgramHasher, tables: Mapping[int, EngramTable],
                 config: EngramLookupConfig = EngramLookupConfig(), *, device: torch.device | str | None = None,
                 caches: Mapping[int, HotRowCache] | None = None, out_dtype: torch.dtype = torch.bfloat16) -> None:
        self.hasher = hasher
        self.config = config
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.out_dtype = out_dtype
        self.tables = dict(tables)
        self.caches = dict(caches or {})
        self._check_layers()
        self.methods = {layer: self._choose_method(table) for layer, table in self.tables.items()}
        self._on_gpu = self.device.type == "cuda"
        self.fused = {layer: self._fuses(layer) for layer in self.tables}
        self._counters = {layer: torch.zeros(3, dtype=torch.int64, device=self.device) for layer in self.tables}
        staged = [layer for layer, method in self.methods.items() if method is GatherMethod.STAGED]
        priority = -1 if config.side_stream_priority is StreamPriority.HIGH else 0  # torch: -1 high, 0 normal
        self._side = torch.cuda.Stream(self.device, priority=priority) if self._on_gpu else None
        self._worker = ThreadPoolExecutor(1, "tiermem-engram-staged") if self._on_gpu and staged else None
        self._slots = {layer: [self._new_slot(layer) for _ in range(config.staging_slots)]
                       for layer in staged if self._on_gpu}
        self._next_slot = 0
        logger.info("engram lookup on %s: %s", self.device, ", ".join(
            f"layer {layer}: {m.value}{' (fused)' if self.fused[layer] else ''}" for layer, m in self.methods.items()))

    def submit(self, token_ids: torch.Tensor, num_positions: int = 1) -> dict[int, LookupHandle]:
        """Start gathering the rows of the last ``num_positions`` positions of ``token_ids`` [B, T].

        Returns layer id -> handle, in layer order. See ``NgramHasher.hash`` for the window rules.
        """
        batch = token_ids.shape[0] if token_ids.dim() == 2 else 0
        if batch * num_positions > self.config.max_tokens_per_submit:
            raise CapacityError(f"engram lookup: {batch} sequences x {num_positions} positions exceed "
                                f"max_tokens_per_submit={self.config.max_tokens_per_submit}; split the batch "
                                f"or raise the limit")
        heads = self.hasher.config.heads_per_layer
        outs = {layer: torch.empty(batch, num_positions, heads, table.layout.row_dim, dtype=self.out_dtype,
                                   device=self.device) for layer, table in self.tables.items()}
        if not self._on_gpu:
            indices = self.hasher.hash(token_ids.cpu(), num_positions)
            for layer in self.tables:
                self._gather(layer, indices[layer], outs[layer])
            return {layer: LookupHandle(layer, outs[layer], resolved(None), None) for layer in self.tables}
        self._side.wait_stream(torch.cuda.current_stream(self.device))
        handles = self._submit_staged(token_ids, num_positions, outs)
        device_layers = [layer for layer in self.tables if layer not in handles]
        if device_layers:
            with torch.cuda.stream(self._side):
                ids = token_ids.to(self.device, non_blocking=True)
                self.hasher.check_window(ids, num_positions)
                unfused = [layer for layer in device_layers if not self.fused[layer]]
                indices = self.hasher.hash(ids, num_positions) if unfused else {}
                for layer in device_layers:
                    if self.fused[layer]:
                        self._hash_gather(layer, ids, num_positions, outs[layer])
                    else:
                        self._gather(layer, indices[layer], outs[layer])
                    event = torch.cuda.Event()
                    event.record(self._side)
                    handles[layer] = LookupHandle(layer, outs[layer], resolved(event), token_ids)
        return {layer: handles[layer] for layer in self.tables}

    def stats(self) -> dict[int, LayerLookupStats]:
        """Row counts per layer since construction (waits for the side stream, then reads the counters)."""
        if self._side is not None:
            self._side.synchronize()
        stats = {}
        for layer, counts in self._counters.items():
            requested, distinct, fetched = counts.tolist()
            dedups = self.methods[layer] is not GatherMethod.RESIDENT and not self.fused[layer]
            stats[layer] = LayerLookupStats(requested, distinct if dedups else None, fetched)
        return stats

    def close(self) -> None:
        """Join the staging worker and drop pinned buffers; idempotent."""
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None
        self._slots = {}

    def __enter__(self) -> EngramLookup:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _submit_staged(self, token_ids: torch.Tensor, num_positions: int,
                       outs: dict[int, torch.Tensor]) -> dict[int, LookupHandle]:
        layers = [layer for layer in self.tables if self.methods[layer] is GatherMethod.STAGED]
        if not layers:
            return {}
        if self._worker is None:
            raise TransferError("engram lookup: submit after close(); create a new EngramLookup")
        futures = {layer: Future() for layer in layers}
        slot = self._next_slot
        self._next_slot = (slot + 1) % self.config.staging_slots
        self._worker.submit(self._run_staged, token_ids.cpu(), num_positions, outs, futures, slot)
        return {layer: LookupHandle(layer, outs[layer], futures[layer], None) for layer in layers}

    def _run_staged(self, token_ids: torch.Tensor, num_positions: int, outs: dict[int, torch.Tensor],
                    futures: dict[int, Future], slot: int) -> None:
        try:
            # inference_mode is thread-local: buffers made under the caller's inference_mode may only be
            # written inside it, and nothing here is ever differentiated.
            with torch.inference_mode(), torch.cuda.device(self.device), torch.cuda.stream(self._side):
                indices = self.hasher.hash(token_ids, num_positions)
                for layer, future in futures.items():
                    self._gather(layer, indices[layer], outs[layer], self._slots[layer][slot])
                    event = torch.cuda.Event()
                    event.record(self._side)
                    future.set_result(event)
        except BaseException as exc:  # surfaced by every pending handle's wait()
            for future in futures.values():
                if not future.done():
                    future.set_exception(exc)

    def _hash_gather(self, layer: int, ids: torch.Tensor, num_positions: int, out: torch.Tensor) -> None:
        """Fill ``out`` with one fused kernel (on the side stream); fp8 rows are decoded after it."""
        table = self.tables[layer]
        direct = table.layout.row_format is RowFormat.BF16 and out.dtype == torch.bfloat16
        fetched = out if direct else torch.empty(math.prod(out.shape[:-1]), table.layout.row_bytes,
                                                 dtype=torch.uint8, device=self.device)
        hash_gather(table.storage, ids, num_positions, self.hasher.layer_constants(layer, self.device),
                    self.hasher.config.heads_per_order, fetched, self._counters[layer],
                    max_programs=self.config.gather_max_programs, cache=self.caches.get(layer))
        if not direct:
            out.view(-1, table.layout.row_dim).copy_(decode_rows(fetched, table.layout, out.dtype))

    def _gather(self, layer: int, indices: torch.Tensor, out: torch.Tensor, slot: _StagingSlot | None = None) -> None:
        """Fill ``out`` with the rows of ``indices``; GPU work goes on the side stream."""
        table, cache, method = self.tables[layer], self.caches.get(layer), self.methods[layer]
        flat, rows_out = indices.reshape(-1), out.view(-1, table.layout.row_dim)
        if method is GatherMethod.RESIDENT:
            table.check_indices(flat)
            rows_out.copy_(decode_rows(table.storage.index_select(0, flat), table.layout, out.dtype))
            self._count(layer, flat.numel(), None)
            return
        table.check_indices(flat)
        plan = plan_fetch(flat, cache)
        fetched = torch.empty(flat.numel(), table.layout.row_bytes, dtype=torch.uint8, device=self.device)
        if method is GatherMethod.UVA:
            uva_gather(table.storage, plan.fetch_ids, plan.fetch_count, fetched,
                       max_programs=self.config.gather_max_programs)
        elif slot is None:  # host without CUDA: no staging, no copy
            staged_gather(table.storage, plan.fetch_ids[: int(plan.fetch_count)], fetched)
        else:
            plan = self._stage(table, plan, fetched, slot)
        self._count(layer, flat.numel(), plan)
        _assemble(plan, fetched, table, cache, rows_out)

    def _stage(self, table: EngramTable, plan: FetchPlan, fetched: torch.Tensor, slot: _StagingSlot) -> FetchPlan:
        """Host half of a staged gather (on the side stream); returns the plan with its requests on the device."""
        size, count = plan.request_rank.numel(), int(plan.fetch_count)
        slot.ready.synchronize()  # the previous copies out of this slot are done
        staged = staged_gather(table.storage, plan.fetch_ids[:count], slot.rows)
        parts = 1 if plan.request_hit is None else 3  # ranks, then hits and cache slots
        packed = slot.plan[: parts * size].view(parts, size)  # contiguous, so one pinned copy
        packed[0] = plan.request_rank
        if plan.request_hit is not None:
            packed[1] = plan.request_hit
            packed[2] = plan.request_slot
        fetched[:count].copy_(staged, non_blocking=True)
        request = packed.to(self.device, non_blocking=True)
        slot.ready.record(self._side)
        hit = None if plan.request_hit is None else request[1].bool()
        slot_ids = None if plan.request_slot is None else request[2]
        return replace(plan, request_rank=request[0], request_hit=hit, request_slot=slot_ids)

    def _count(self, layer: int, requested: int, plan: FetchPlan | None) -> None:
        counters = self._counters[layer]
        if plan is None:  # every requested row is read
            counters[0::2] += requested
            return
        counters[0] += requested
        counters[1] += plan.distinct_rows.to(self.device, non_blocking=True)[0]
        counters[2] += plan.fetch_count.to(self.device, non_blocking=True)[0]
        if layer in self.caches:
            self.caches[layer].record(plan.distinct_rows, plan.hit_rows)

    def _check_layers(self) -> None:
        expected = set(self.hasher.config.layer_ids)
        if set(self.tables) != expected:
            raise ConfigError(f"engram lookup: tables given for layers {sorted(self.tables)}, the hash config "
                              f"has Engram layers {sorted(expected)}; pass one table per Engram layer")
        for layer, table in self.tables.items():
            rows = self.hasher.rows_for_layer(layer)
            if table.layout.num_rows != rows:
                raise ConfigError(f"engram lookup: table {table.name!r} of layer {layer} has "
                                  f"{table.layout.num_rows} rows, its hash heads need {rows} (sum of primes "
                                  f"{self.hasher.primes[layer]}); build the table from the same hash config")
        unknown = set(self.caches) - expected
        if unknown:
            raise ConfigError(f"engram lookup: caches given for layers {sorted(unknown)} without an Engram")
        for layer, cache in self.caches.items():
            table = self.tables[layer]
            if cache.device != self.device or cache.row_bytes != table.layout.row_bytes:
                raise ConfigError(f"engram lookup: the cache of layer {layer} holds {cache.row_bytes}-byte rows on "
                                  f"{cache.device}; the lookup needs {table.layout.row_bytes}-byte rows of "
                                  f"{table.name!r} on {self.device}; build it from that table on that device")

    def _choose_method(self, table: EngramTable) -> GatherMethod:
        method, on_device = self.config.method, table.device == self.device
        if on_device and method in (GatherMethod.AUTO, GatherMethod.RESIDENT):
            return GatherMethod.RESIDENT
        if method is GatherMethod.RESIDENT or table.device.type != "cpu":
            raise ConfigError(f"engram lookup: table {table.name!r} is on {table.device}, rows are needed on "
                              f"{self.device}; method {method.value} needs the table on the compute device or "
                              f"in host memory")
        if self.device.type == "cpu":
            if method is GatherMethod.UVA:
                raise ConfigError("engram lookup: the uva method needs a CUDA device; use staged or resident")
            return GatherMethod.STAGED
        if not table.is_pinned:
            raise TransferError(f"engram lookup: table {table.name!r} ({table.layout.nbytes} bytes) is pageable "
                                f"host memory; GPU gathers need pinned/registered memory from a host tier "
                                f"(pageable copies run ~7x slower)")
        if method is GatherMethod.AUTO:
            big_rows = table.layout.row_bytes >= self.config.uva_min_row_bytes
            return GatherMethod.UVA if big_rows and uva_available() else GatherMethod.STAGED
        if method is GatherMethod.UVA and not uva_available():
            raise ConfigError("engram lookup: the uva method needs Triton (tiermem[gpu]); use staged")
        return method

    def _fuses(self, layer: int) -> bool:
        """GPU layers hash, probe their cache and gather in one kernel, where Triton is available."""
        on_device = self.methods[layer] in (GatherMethod.RESIDENT, GatherMethod.UVA)
        return self._on_gpu and on_device and self.config.fuse_hash_gather and uva_available()

    def _new_slot(self, layer: int) -> _StagingSlot:
        rows = self.config.max_tokens_per_submit * self.hasher.config.heads_per_layer
        row_bytes = self.tables[layer].layout.row_bytes
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))
        return _StagingSlot(torch.empty(rows, row_bytes, dtype=torch.uint8, pin_memory=True),
                            torch.empty(3 * rows, dtype=torch.int64, pin_memory=True), ready)


def _assemble(plan: FetchPlan, fetched: torch.Tensor, table: EngramTable, cache: HotRowCache | None,
              out: torch.Tensor) -> None:
    """``out[i]`` = decoded requested row ``i``, from the fetched rows or the cache (see FetchPlan)."""
    torch.index_select(decode_rows(fetched, table.layout, out.dtype), 0, plan.request_rank, out=out)
    if plan.request_hit is not None:
        cached = decode_rows(cache.rows.index_select(0, plan.request_slot), table.layout, out.dtype)
        out.copy_(torch.where(plan.request_hit[:, None], cached, out))
