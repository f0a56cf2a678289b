"""``tiermem bench moe`` end to end on the CPU stand-in: a synthetic trace, every mode, one record each."""

from __future__ import annotations

import argparse
import json

import pytest

from tiermem.bench import moe, moe_workloads


def test_bench_moe_replays_a_trace_and_reports_every_mode(tmp_path):
    parser = argparse.ArgumentParser()
    moe.add_parser(parser.add_subparsers())
    args = parser.parse_args(["moe", "--device", "cpu", "--workloads", "tiny@uniform", "--quick",
                              "--batches", "1", "4", "--max-steps", "8",
                              "--out", str(tmp_path)])
    assert args.func(args) == 0
    records = [json.loads(line) for line in (tmp_path / "moe.jsonl").read_text().splitlines()]
    runs = [r for r in records if r["kind"] == "run"]
    # batches x modes (one fraction); device_tiermem only with a fitted predictor (none for uniform routing); at
    # batch 4 a layer's 4 x top-2 pairs exceed its 4 slots, so the device pager runs it in waves
    assert {r["mode"] for r in runs} == set(moe.MODES) - {"device_tiermem"}
    assert [r["mode"] for r in runs if r["batch"] == 4] == ["all_hbm", "lru", "lfu", "tiermem", "device_lru",
                                                            "device_pipelined"]
    assert len(runs) == 2 * len(moe.MODES) - 2
    assert all(r["hit_rate"] == 1.0 and r["bytes_moved"] == 0 for r in runs if r["mode"] == "all_hbm")
    offloaded = [r for r in runs if r["mode"] != "all_hbm"]
    assert all(0.0 <= r["hit_rate"] < 1.0 and r["misses"] > 0 for r in offloaded)
    assert [r["pager"] for r in offloaded if r["batch"] == 1] == ["host", "host", "host", "device", "device"]
    assert [r["pipelined_waves"] for r in offloaded if r["pager"] == "device"] == [False, True] * 2
    summaries = [r for r in records if r["kind"] == "summary"]
    assert all(r["sim_belady"] >= r["sim_lru"] for r in summaries)
    assert all(r["tokens_per_s_vs_lru"] > 0 and "gap_closed" in r for r in summaries)
    assert [r["batch"] for r in summaries if r.get("device_lru_vs_lru", 0) > 0] == [1, 4]
    assert [r["batch"] for r in summaries if r.get("device_pipelined_vs_lru", 0) > 0] == [1, 4]
    host_paged = [r for r in runs if r["pager"] == "host"]
    phases = [r["host_us_per_layer"] for r in host_paged]
    assert all({"route_sync", "route", "compute", "total"} <= set(p) for p in phases)
    assert all(abs(p["total"] - sum(v for k, v in p.items() if k != "total")) < 1e-6 * p["total"] for p in phases)
    assert all("demand_submit" in r["host_us_per_layer"] for r in host_paged if r["mode"] != "all_hbm")
    assert all(set(r["host_us_per_layer"]) == {"device", "total"} for r in runs if r["pager"] == "device")


def test_rounds_interleave_the_modes_and_report_each_modes_median_round(tmp_path):
    parser = argparse.ArgumentParser()
    moe.add_parser(parser.add_subparsers())
    args = parser.parse_args(["moe", "--device", "cpu", "--workloads", "tiny@uniform", "--quick", "--batches", "1",
                              "--max-steps", "4", "--rounds", "3", "--out", str(tmp_path)])
    assert args.func(args) == 0
    records = [json.loads(line) for line in (tmp_path / "moe.jsonl").read_text().splitlines()]
    offloaded = [r for r in records if r["kind"] == "run" and r["mode"] != "all_hbm"]
    assert len(offloaded) == 5  # one record per mode: its median round
    for run in offloaded:
        assert len(run["round_tokens_per_s"]) == 3 and run["tokens_per_s"] == sorted(run["round_tokens_per_s"])[1]
    (summary,) = [r for r in records if r["kind"] == "summary"]
    by_mode = {r["mode"]: r["round_tokens_per_s"] for r in offloaded}
    assert summary["round_tokens_per_s_vs_lru"] == [t / lru for t, lru in zip(by_mode["tiermem"], by_mode["lru"])]
    args.rounds = 0
    with pytest.raises(SystemExit, match="--rounds must be at least 1"):
        args.func(args)


def test_median_run_takes_the_lower_middle_round_of_an_even_count():
    rounds = [{"tokens_per_s": t, "label": i} for i, t in enumerate((30.0, 10.0, 40.0, 20.0))]
    assert moe.median_run(rounds)["label"] == 3  # 20 of 10, 20, 30, 40
    assert moe.median_run(rounds)["round_tokens_per_s"] == [30.0, 10.0, 40.0, 20.0]


def test_the_bench_predictor_is_any_registered_one_fitted_on_the_other_half_of_the_sequences():
    import numpy as np
    import pytest

    from tiermem.errors import RegistryError
    from tiermem.predict.base import RouteContext
    from tiermem.predict.synthetic import SyntheticConfig, synthetic_trace

    routes = synthetic_trace(SyntheticConfig(num_sequences=6, num_layers=3, num_experts=8, top_k=2, seed=0))
    predictor = moe_workloads.CrossFitted(routes, 1, "cooccurrence")  # reads the previous step's routing too
    assert predictor.name == "cooccurrence" and len(predictor.models) == 2
    current = np.full((3, 3, 2), -1, dtype=np.int16)
    current[:, 0] = [[0, 1], [2, 3], [4, 5]]
    previous = np.random.default_rng(0).integers(0, 8, size=(3, 3, 2)).astype(np.int16)
    predictor.seqs = np.array([0, 1, 2])  # rows from both halves: each row is scored by the other half's model alone
    scores = predictor.predict(RouteContext(num_experts=8, layer=0, current=current, previous=previous), 1)
    for row, parity in ((0, 0), (1, 1), (2, 0)):
        alone = predictor.models[parity].predict(RouteContext(num_experts=8, layer=0, current=current[row:row + 1],
                                                              previous=previous[row:row + 1]), 1)
        assert np.array_equal(scores[:, row], alone[:, 0])
    with pytest.raises(RegistryError):
        moe_workloads.CrossFitted(routes, 1, "no-such-predictor")


def test_the_cross_fitted_predictor_hands_each_half_its_own_rows_of_the_hidden_state_where_it_lives():
    import numpy as np
    import torch

    from tiermem.predict.base import RouteContext
    from tiermem.predict.synthetic import SyntheticConfig, synthetic_trace

    class Seen:
        def __init__(self) -> None:
            self.hidden: list[torch.Tensor] = []

        def predict(self, context, distance):
            self.hidden.append(context.hidden)
            return np.zeros((distance, context.batch_size, context.num_experts), dtype=np.float32)

    routes = synthetic_trace(SyntheticConfig(num_sequences=6, num_layers=3, num_experts=8, top_k=2, seed=0))
    predictor = moe_workloads.CrossFitted(routes, 1, "cooccurrence")
    assert not predictor.reads_hidden  # co-occurrence reads the routing only: its models get no hidden state
    predictor.models = [Seen(), Seen()]
    predictor.seqs = np.array([3, 0, 5, 2])  # parities 1, 0, 1, 0
    hidden = torch.arange(4 * 3, dtype=torch.float32).reshape(4, 3)
    current = np.zeros((4, 3, 2), dtype=np.int16)
    context = RouteContext(num_experts=8, layer=0, current=current, hidden=hidden)
    predictor.predict(context, 1)
    assert predictor.models[0].hidden == [None] and predictor.models[1].hidden == [None]
    predictor.reads_hidden = True  # as for models that read it (learned with hidden states, next-gate)
    predictor.predict(context, 1)
    assert torch.equal(predictor.models[0].hidden[1], hidden[[1, 3]])
    assert torch.equal(predictor.models[1].hidden[1], hidden[[0, 2]])
    assert predictor.models[0].hidden[1].device == hidden.device


def test_a_trace_with_router_inputs_hands_each_layers_recorded_input_to_the_predictor(tmp_path):
    import dataclasses

    import numpy as np
    import torch

    from tiermem.manager import ManagerConfig, TierManager
    from tiermem.predict.synthetic import SyntheticConfig, synthetic_trace
    from tiermem.predict.trace import save_trace
    from tiermem.prefetch.prefetcher import PrefetchConfig

    routes = synthetic_trace(SyntheticConfig(num_sequences=4, num_layers=3, num_experts=16, top_k=2, seed=1))
    hidden = np.random.default_rng(0).standard_normal((routes.num_tokens, 3, 8)).astype(np.float16)
    save_trace(dataclasses.replace(routes, hidden=hidden), tmp_path / moe_workloads.REAL_TRACES["moe-lm"])
    work = moe_workloads.workloads(tmp_path, ["tiny@moe-lm"], False)[0]
    seen: list[tuple[int, np.ndarray]] = []

    class Records:  # stands in for a cross-fitted predictor: the bench sets seqs and reads name
        name, seqs = "records", None

        def predict(self, context, distance):
            seen.append((context.layer, context.hidden.numpy()))
            return np.zeros((distance, context.batch_size, context.num_experts), dtype=np.float32)

    predictor = Records()
    manager = TierManager(ManagerConfig.from_dict({"tiers": [{"kind": "dram", "capacity_bytes": "64MiB",
                                                              "arena_bytes": "8MiB"}]}))
    store = moe.build_store(manager, work.shape, work.trace.layers, torch.device("cpu"), torch.bfloat16)
    steps, _ = moe_workloads.batch_steps(work.trace, 2, 4)
    moe.run_mode(store, work, steps, mode="tiermem", fraction=0.5, batch=2, device=torch.device("cpu"),
                 prefetch=PrefetchConfig(distance=1, link_fill=None), predictor=predictor)
    assert len(seen) == len(steps) * 3
    for i, step in enumerate(steps):
        for position in range(3):
            layer, got = seen[i * 3 + position]
            assert layer == position
            np.testing.assert_array_equal(got, hidden[list(step.rows), position].astype(np.float32))
    store.close()
    manager.close()
