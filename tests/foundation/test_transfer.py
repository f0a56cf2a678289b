"""The transfer engine: batched asynchronous copies, chunking, validation."""

from __future__ import annotations

import pytest
import torch

from tiermem.errors import TransferError
from tiermem.transfer import TransferConfig, TransferEngine, make_plan
from tiermem.transfer.plan import Direction, split_chunks

CHUNK_BYTES = 64 * 1024


def test_split_chunks_covers_every_byte_once_in_order():
    pieces = split_chunks(10 * CHUNK_BYTES + 7, CHUNK_BYTES)
    assert pieces[0] == (0, CHUNK_BYTES) and pieces[-1] == (10 * CHUNK_BYTES, 7)
    assert sum(size for _, size in pieces) == 10 * CHUNK_BYTES + 7
    assert all(a + s == b for (a, s), (b, _) in zip(pieces, pieces[1:]))


def test_host_copies_of_many_objects_land_byte_exact():
    engine = TransferEngine(TransferConfig(host_chunk_bytes=CHUNK_BYTES, host_threads=2))
    sources = [torch.randint(0, 255, (n,), dtype=torch.uint8) for n in (1, 5000, 3 * CHUNK_BYTES + 11)]
    targets = [torch.empty_like(s) for s in sources]
    handle = engine.submit(make_plan(zip(sources, targets)))
    handle.wait()
    assert handle.done() and handle.nbytes == sum(s.numel() for s in sources)
    assert all(torch.equal(s, t) for s, t in zip(sources, targets))
    assert engine.stats()["h2h_bytes"] == handle.nbytes
    engine.close()


def test_copies_between_dtypes_move_raw_bytes():
    source = torch.arange(16, dtype=torch.float32)
    target = torch.empty(64, dtype=torch.uint8)
    engine = TransferEngine()
    engine.submit(make_plan([(source, target)])).wait()
    assert torch.equal(target.view(torch.float32), source)
    engine.close()


def test_size_mismatch_and_non_contiguous_are_refused_before_any_io():
    with pytest.raises(TransferError, match="source has 40 bytes but destination has 44"):
        make_plan([(torch.zeros(10), torch.zeros(11))])
    with pytest.raises(TransferError, match="not contiguous"):
        make_plan([(torch.zeros(4, 4).t(), torch.zeros(4, 4))])


def test_closed_engine_refuses_submissions():
    engine = TransferEngine()
    engine.close()
    with pytest.raises(TransferError, match="engine is closed"):
        engine.submit(make_plan([(torch.zeros(1), torch.zeros(1))]))


@pytest.mark.gpu
def test_gpu_copies_from_pageable_memory_are_refused():
    with pytest.raises(TransferError, match="pageable"):
        make_plan([(torch.zeros(1024), torch.zeros(1024, device="cuda"))])
    with pytest.raises(TransferError, match="pageable"):
        make_plan([(torch.zeros(1024, device="cuda"), torch.zeros(1024))])


@pytest.mark.gpu
def test_gpu_round_trip_in_both_directions_at_once_is_byte_exact():
    engine = TransferEngine(TransferConfig(chunk_bytes=1 << 20))
    host_in = torch.randint(0, 255, (5 << 20,), dtype=torch.uint8).pin_memory()
    device_in = torch.randint(0, 255, (5 << 20,), dtype=torch.uint8, device="cuda")
    device_out = torch.empty_like(device_in)
    host_out = torch.empty_like(host_in).pin_memory()
    plan = make_plan([(host_in, device_out), (device_in, host_out)])
    assert [c.direction for c in plan.copies] == [Direction.H2D, Direction.D2H]
    engine.submit(plan).wait()
    assert torch.equal(device_out.cpu(), host_in) and torch.equal(host_out, device_in.cpu())
    engine.close()


@pytest.mark.gpu
def test_tiermem_host_tiers_are_registered_for_dma():
    from tiermem.manager import TierManager

    config = {"tiers": [{"kind": "dram", "capacity_bytes": "8MiB"}, {"kind": "hbm", "capacity_bytes": "8MiB"},
                        {"kind": "cxl", "backing": "emulated", "capacity_bytes": "8MiB"}]}
    with TierManager.from_config(config) as tm:
        host = tm.empty(1 << 20, tier="cxl")
        assert host.is_pinned()
        host.copy_(torch.randint(0, 255, (1 << 20,), dtype=torch.uint8))
        on_gpu = tm.to(host, "hbm")
        back = tm.to(on_gpu, "dram")
        assert on_gpu.is_cuda and torch.equal(back, host)


def test_the_copy_fast_path_reports_a_missing_runtime_instead_of_crashing():
    from tiermem.transfer import cudart

    if cudart.available():
        pytest.skip("this process has a CUDA runtime mapped")
    with pytest.raises(TransferError, match="no CUDA runtime"):
        cudart.memcpy_async(0, 0, 1, 0)


@pytest.mark.gpu
def test_gpu_copies_use_the_runtime_fast_path_and_land_at_offsets_byte_exact():
    from tiermem.transfer import cudart

    assert cudart.available()  # torch's libcudart is mapped once CUDA is initialised
    engine = TransferEngine(TransferConfig(chunk_bytes=(1 << 20) + 512))  # chunks at odd offsets
    host = torch.randint(0, 255, (8 << 20,), dtype=torch.uint8).pin_memory()
    device = torch.zeros(16 << 20, dtype=torch.uint8, device="cuda")
    window = device.narrow(0, 4096 + 256, 8 << 20)
    engine.submit(make_plan([(host, window)])).wait()
    assert torch.equal(window.cpu(), host)
    assert int(device[:4096 + 256].count_nonzero()) == 0 and int(device[4096 + 256 + (8 << 20):].count_nonzero()) == 0
    engine.close()


@pytest.mark.gpu
def test_gpu_copies_start_after_the_work_queued_on_the_after_stream():
    engine = TransferEngine()
    host = torch.randint(1, 255, (4 << 20,), dtype=torch.uint8).pin_memory()
    device = torch.empty(4 << 20, dtype=torch.uint8, device="cuda")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # tens of ms: a copy that did not wait would land first
        device.fill_(0)
    engine.submit(make_plan([(host, device)]), after=side).wait()
    assert torch.equal(device.cpu(), host)  # the copy came after the fill, so nothing of it was overwritten
    engine.close()


def test_endpoints_are_validated_once_as_a_plan_would_be():
    from tiermem.transfer import endpoint

    with pytest.raises(TransferError, match="not contiguous"):
        endpoint(torch.zeros(4, 4).t())
    with pytest.raises(TransferError, match="pageable"):  # a host endpoint is only ever the pinned side of a copy
        endpoint(torch.zeros(8), "source")


def test_direct_copies_without_the_runtime_fast_path_say_what_to_do_instead():
    from tiermem.transfer import cudart
    from tiermem.transfer.plan import Endpoint

    engine = TransferEngine()
    if cudart.available():
        pytest.skip("this process has a CUDA runtime mapped")
    assert not engine.direct_available
    with pytest.raises(TransferError, match="submit a plan instead"):
        engine.submit_direct([(Endpoint(0, 8, None), Endpoint(0, 8, torch.device("cuda", 0)))])
    engine.close()


@pytest.mark.gpu
def test_direct_copies_land_byte_exact_each_with_its_own_handle_and_refuse_mismatched_pairs():
    from tiermem.transfer import endpoint

    engine = TransferEngine(TransferConfig(chunk_bytes=(1 << 20) + 512))  # the second copy is chunked
    homes = [torch.randint(0, 255, (n,), dtype=torch.uint8).pin_memory() for n in (4096, 3 << 20)]
    slots = torch.zeros(2, 3 << 20, dtype=torch.uint8, device="cuda")
    targets = [slots[0, :4096], slots[1]]
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # tens of ms: a copy that did not wait for this stream would land first
        slots.fill_(7)
    pairs = [(endpoint(h, "source"), endpoint(t, "destination")) for h, t in zip(homes, targets)]
    handle = engine.submit_direct(pairs, background=True, after=side)
    assert handle.nbytes == 4096 + (3 << 20) and [handle.part(i).nbytes for i in (0, 1)] == [4096, 3 << 20]
    handle.part(0).wait()
    assert handle.part(0).done()
    handle.wait()
    assert handle.done() and handle.part(1).done()
    assert all(torch.equal(t.cpu(), h) for h, t in zip(homes, targets))
    assert int((slots[0, 4096:] == 7).all()) == 1  # nothing beyond the first copy's bytes was written
    assert engine.stats()["h2d_bytes"] == 4096 + (3 << 20)
    slots.zero_()  # on the current stream, which the next submit starts after (its default)
    whole = engine.submit_direct(pairs, parts=False)  # one completion for the batch alone
    assert whole.part(0) is whole and whole.part(1) is whole
    whole.wait_on(torch.cuda.current_stream())
    assert all(torch.equal(t.cpu(), h) for h, t in zip(homes, targets)) and whole.done()
    with pytest.raises(TransferError, match="same size"):
        engine.submit_direct([(pairs[0][0], pairs[1][1])])
    with pytest.raises(TransferError, match="pinned host memory to a GPU buffer"):
        engine.submit_direct([(pairs[0][1], pairs[0][0])])
    engine.close()
