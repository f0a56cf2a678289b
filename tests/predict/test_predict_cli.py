"""``tiermem predictor train | eval`` end to end on small traces."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from tiermem.cli import predictor
from tiermem.errors import TraceError
from tiermem.predict.learned import LearnedPredictor
from tiermem.predict.synthetic import SyntheticConfig, gate_routed_trace, synthetic_trace
from tiermem.predict.trace import save_trace

SMALL = SyntheticConfig(num_sequences=6, prefill_tokens=3, decode_tokens=10, num_layers=3, num_experts=8,
                        layer_correlation=0.7)
QUICK = ["--max-steps", "30", "--hidden-dim", "32"]
HIDDEN = 8
EVERY_PREDICTOR = ("popularity", "frequency", "cooccurrence", "activation-match", "learned")


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    predictor.add_parser(parser.add_subparsers())
    args = parser.parse_args(["predictor", *argv])
    return args.func(args)


@pytest.fixture
def wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")


@pytest.fixture
def trace_file(tmp_path):
    path = tmp_path / "trace.npz"
    save_trace(synthetic_trace(SMALL), path)
    return path


def test_train_then_eval_on_the_held_out_sequences(trace_file, tmp_path, capsys, wide_console):
    model = tmp_path / "model.pt"
    assert run("train", "--trace", str(trace_file), "--out", str(model), *QUICK) == 0
    assert "held out 3: [1, 3, 5]" in capsys.readouterr().out
    report = tmp_path / "report.json"
    assert run("eval", "--trace", str(trace_file), "--model", str(model), "--json", str(report)) == 0
    out = capsys.readouterr().out
    for name in (*EVERY_PREDICTOR, "oracle", "us/call", "held out the 3 sequences"):
        assert name in out
    metrics = json.loads(report.read_text())["metrics"]
    assert {m["predictor"] for m in metrics} == {*EVERY_PREDICTOR, "oracle"}
    assert all(m["recall_k"] == 1.0 for m in metrics if m["predictor"] == "oracle")


def test_eval_without_a_model_cross_validates(trace_file, capsys, wide_console):
    assert run("eval", "--trace", str(trace_file), "--no-oracle", *QUICK) == 0
    out = capsys.readouterr().out
    assert "2-fold by seq_id % 2" in out and "learned" in out and "oracle" not in out


def test_a_trace_with_one_sequence_is_refused_clearly(tmp_path):
    path = tmp_path / "one.npz"
    save_trace(synthetic_trace(SyntheticConfig(num_sequences=1)), path)
    with pytest.raises(TraceError, match="seq ids"):
        run("train", "--trace", str(path), "--out", str(tmp_path / "m.pt"), *QUICK)
    with pytest.raises(TraceError, match="folds"):
        run("eval", "--trace", str(path), *QUICK)


def test_eval_says_which_layers_of_the_real_qwen_trace_it_uses(shared_traces, tmp_path, capsys, wide_console):
    trace = shared_traces / "qwen1.5-moe-a2.7b-chat_vllm-moe-logger.npz"
    model = tmp_path / "qwen.pt"
    assert run("train", "--trace", str(trace), "--out", str(model), *QUICK) == 0
    assert run("eval", "--trace", str(trace), "--model", str(model)) == 0
    out = capsys.readouterr().out
    assert "only layers 0, 8, 12, 18, 23 have data" in out and "distance 1 = the next logged layer" in out


def test_train_with_router_gates_uses_the_hidden_states_and_refuses_gates_of_another_shape(tmp_path):
    trace, gates = gate_routed_trace(SMALL, hidden_size=HIDDEN)
    save_trace(trace, tmp_path / "gated.npz")
    np.save(tmp_path / "gates.npy", torch.stack(gates).numpy())
    assert run("train", "--trace", str(tmp_path / "gated.npz"), "--gates", str(tmp_path / "gates.npy"),
               "--out", str(tmp_path / "model.pt"), *QUICK) == 0
    model = LearnedPredictor.load(tmp_path / "model.pt")
    assert model.net.hidden_size == HIDDEN and model.net.hidden_heads == (False,) + (True,) * SMALL.num_layers
    np.save(tmp_path / "bad.npy", torch.stack(gates).numpy()[:, :, :2])
    with pytest.raises(TraceError, match="gates"):
        run("train", "--trace", str(tmp_path / "gated.npz"), "--gates", str(tmp_path / "bad.npy"),
            "--out", str(tmp_path / "model.pt"), *QUICK)
