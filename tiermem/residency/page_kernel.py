"""The Triton kernel behind ``DevicePager.page`` on a GPU; imported on first use, so ``import tiermem`` needs no Triton.

``page_kernel`` pages one wave of one slot group in a single program: the same decisions, tie rules
and table writes as the pager's tensor operations (``device_pager``), which launch about fifty
kernels per wave. Each step is a reduction over a pairs x pairs or slots x slots tile, so the
kernel serves groups of at most ``MAX_LANES`` slots and waves of at most ``MAX_LANES`` pairs.

Writes never race: the objects evicted (resident, not needed) and the objects copied in (needed,
not resident) are disjoint, so are their ``object_slot`` entries; every store depends on a
reduction over all lanes, which orders it after every load of the same table.
"""

from __future__ import annotations

import triton
import triton.language as tl

KEEP = tl.constexpr(9223372036854775807)  # the eviction rank of a slot the wave needs (int64 max): never a victim


@triton.jit
def page_kernel(objects_ptr, keep_ptr, num_pairs, object_slot_ptr, slot_object_ptr, last_use_ptr, uses_ptr, scores_ptr,
                clock_ptr, needed_ptr, loads_ptr, pair_slot_ptr, missing_ptr, victims_ptr, count_ptr, index_ptr,
                num_objects, num_slots, top_k, LFU: tl.constexpr, PREDICTED: tl.constexpr, PAIRS: tl.constexpr,
                SLOTS: tl.constexpr):
    p = tl.arange(0, PAIRS)
    in_wave = p < num_pairs
    obj = tl.load(objects_ptr + p, mask=in_wave, other=-1).to(tl.int64)
    valid = in_wave & (obj >= 0) & (obj < num_objects)
    obj = tl.where(valid, obj, -1)
    same = (obj[:, None] == obj[None, :]) & valid[:, None] & valid[None, :]  # [p, q]
    earlier = p[None, :] < p[:, None]  # q before p
    first = valid & (tl.sum((same & earlier).to(tl.int32), axis=1) == 0)
    slot = tl.load(object_slot_ptr + obj, mask=valid, other=-1)
    missed = first & (slot < 0)
    num_missed = tl.sum(missed.to(tl.int64), axis=0)
    miss_rank = tl.sum(((obj[None, :] < obj[:, None]) & missed[None, :]).to(tl.int32), axis=1)  # by object id

    s = tl.arange(0, SLOTS)
    in_group = s < num_slots
    held = tl.load(slot_object_ptr + s, mask=in_group, other=-1)
    rank = tl.load(last_use_ptr + s, mask=in_group, other=0)
    if LFU:
        rank = (tl.load(uses_ptr + held, mask=held >= 0, other=0) << 32) + rank
    if PREDICTED:  # the held object's score after this wave's distinct objects: sum of their table rows
        score = tl.load(scores_ptr + obj[None, :] * num_objects + held[:, None],
                        mask=(held[:, None] >= 0) & first[None, :], other=0)
        rank = (tl.sum(score, axis=1) << 32) + rank
    rank = tl.where(held < 0, -1, rank)
    spare = tl.load(keep_ptr + p, mask=in_wave, other=-1).to(tl.int64)  # objects a computing wave still reads
    spare = tl.where((spare >= 0) & (spare < num_objects), spare, -1)
    kept = tl.sum((((held[:, None] == obj[None, :]) & valid[None, :]) |
                   ((held[:, None] == spare[None, :]) & (spare[None, :] >= 0))).to(tl.int32), axis=1) > 0
    rank = tl.where(kept | ~in_group, KEEP, rank)
    ahead = (rank[None, :] < rank[:, None]) | ((rank[None, :] == rank[:, None]) & (s[None, :] < s[:, None]))
    slot_rank = tl.sum(ahead.to(tl.int32), axis=1)  # place in eviction order, ties to the lower slot
    pick = (slot_rank[None, :] == miss_rank[:, None]) & missed[:, None]  # [p, s]: the missed pair's victim
    victim = tl.sum(tl.where(pick, s[None, :], 0), axis=1).to(tl.int64)
    evicted = tl.sum(tl.where(pick, held[None, :], 0), axis=1)

    tl.store(object_slot_ptr + evicted, tl.full([PAIRS], -1, tl.int64), mask=missed & (evicted >= 0))
    tl.store(object_slot_ptr + obj, victim, mask=missed)
    tl.store(slot_object_ptr + victim, obj, mask=missed)
    landed = tl.where(missed, victim, slot)  # the slot of each first occurrence
    pair_slot = tl.sum(tl.where(same & first[None, :], landed[None, :], 0), axis=1)
    pair_slot = tl.where(valid, pair_slot, -1)
    clock = tl.load(clock_ptr) + 1
    tl.store(clock_ptr, clock)
    tl.store(last_use_ptr + pair_slot, tl.zeros([PAIRS], tl.int64) + clock, mask=valid)
    if LFU:
        uses = tl.load(uses_ptr + obj, mask=first, other=0)
        tl.store(uses_ptr + obj, uses + tl.sum(same.to(tl.int64), axis=1), mask=first)
    tl.store(needed_ptr, tl.load(needed_ptr) + tl.sum(first.to(tl.int64), axis=0))
    tl.store(loads_ptr + obj, tl.load(loads_ptr + obj, mask=missed, other=0) + 1, mask=missed)
    tl.store(pair_slot_ptr + p, pair_slot, mask=in_wave)
    tl.store(missing_ptr + miss_rank, obj, mask=missed)
    tl.store(victims_ptr + miss_rank, victim, mask=missed)
    tl.store(count_ptr, num_missed)

    order = tl.where(valid, pair_slot, num_slots)  # the wave index: pairs by slot (stable), tokens, slot ends
    before = ((order[None, :] < order[:, None]) | ((order[None, :] == order[:, None]) & earlier)) & in_wave[None, :]
    position = tl.sum(before.to(tl.int32), axis=1)
    tl.store(index_ptr + position, p.to(tl.int64), mask=in_wave)
    tl.store(index_ptr + num_pairs + position, (p // top_k).to(tl.int64), mask=in_wave)
    ends = tl.sum(((order[None, :] <= s[:, None]) & in_wave[None, :]).to(tl.int64), axis=1)
    tl.store(index_ptr + 2 * num_pairs + s, ends, mask=in_group)
