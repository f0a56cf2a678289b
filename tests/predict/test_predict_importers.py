"""Each importer on a small fixture written in that tool's documented format."""

from __future__ import annotations

import base64
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tiermem.errors import TraceError
from tiermem.predict.importers import (
    TraceRecorder,
    from_router_logits,
    from_sglang_routed_experts,
    from_vllm_outputs,
    load_sglang_per_token_dump,
)
from tiermem.predict.trace import DECODE, PREFILL

LAYERS, TOP_K, EXPERTS = 3, 2, 4
SGLANG_TOPK_COLUMNS = 8  # the recorder's buffer is [layers, tokens, 8] whatever the model's top-k
EXTEND, DECODE_MODE, MIXED, IDLE = 1, 2, 3, 4  # sglang ForwardMode values


def physical_ids(rng: np.random.Generator, count: int) -> np.ndarray:
    """[LAYERS, count, 8] int32: layer 0 dense (-1); layers 1-2 a top-2 of the 4 logical experts, each
    placed on one physical replica (logical 1 lives on physical 1 and 4); columns past top-k are -1."""
    ids = np.full((LAYERS, count, SGLANG_TOPK_COLUMNS), -1, dtype=np.int32)
    for layer in (1, 2):
        for row in range(count):
            logical = rng.permutation(EXPERTS)[:TOP_K]
            ids[layer, row, :TOP_K] = np.where(logical == 1, rng.choice([1, 4]), logical)
    return ids


def test_sglang_per_token_dump_rebuilds_sequences_phases_and_logical_ids(tmp_path):
    rng = np.random.default_rng(0)
    mapping = np.array([[0, 1, 2, 3, 1]] * LAYERS)  # physical expert 4 is a replica of logical 1
    passes = [  # (mode, positions, extend_seq_lens): A and B prefill, decode, C joins in a mixed pass, B ends
        (EXTEND, [0, 1, 2, 0, 1], [3, 2]),
        (DECODE_MODE, [3, 2], None),
        (MIXED, [0, 1, 4, 3], [2, 1, 1]),
        (IDLE, [], None),
        (DECODE_MODE, [5, 2], None),
    ]
    owners = [["A", "A", "A", "B", "B"], ["A", "B"], ["C", "C", "A", "B"], [], ["A", "C"]]
    records, expected = [], {}
    for pass_id, ((mode, positions, lengths), owner) in enumerate(zip(passes, owners)):
        ids = physical_ids(rng, len(positions))
        records.append({
            "forward_pass_id": pass_id, "rank": 0, "gatherer_key": "primary",
            "input_ids": [100 + p for p in positions], "positions": positions, "extend_seq_lens": lengths,
            "forward_mode": mode, "topk_ids_of_layer": torch.from_numpy(ids), "misc_objects": [],
            "global_physical_count": torch.zeros(LAYERS, 5, dtype=torch.int32),
        })
        for row, (seq, pos) in enumerate(zip(owner, positions)):
            physical = ids[:, row, :TOP_K]
            logical = np.where(physical >= 0, mapping[np.arange(LAYERS)[:, None], np.maximum(physical, 0)], -1)
            decoding = mode == DECODE_MODE or (mode == MIXED and seq != "C")
            expected[(seq, pos)] = (logical, DECODE if decoding else PREFILL)
    torch.save({"records": records, "last_physical_to_logical_map": torch.from_numpy(mapping)}, tmp_path / "d.pt")

    trace = load_sglang_per_token_dump(tmp_path / "d.pt", model="tiny")

    assert (trace.num_experts, trace.top_k, trace.num_tokens) == (EXPERTS, TOP_K, 13)
    names = {0: "A", 1: "B", 2: "C"}
    for row in range(trace.num_tokens):
        logical, phase = expected[(names[int(trace.seq_id[row])], int(trace.pos[row]))]
        assert np.array_equal(trace.experts[row], logical) and trace.phase[row] == phase
        assert trace.token_ids[row] == 100 + trace.pos[row]
    assert [int((trace.seq_id == s).sum()) for s in range(3)] == [6, 4, 3]


def test_sglang_stat_mode_dump_is_refused(tmp_path):
    torch.save({"rank": 0, "logical_count": torch.zeros(2, 3, 4)}, tmp_path / "stat.pt")
    with pytest.raises(TraceError, match="per_token"):
        load_sglang_per_token_dump(tmp_path / "stat.pt")


def test_sglang_return_routed_experts_answers_become_sequences():
    prompt, completion = 3, 3
    routes = np.zeros((prompt + completion - 1, LAYERS, TOP_K), dtype=np.int32)  # layer 0 dense: zero-filled
    routes[:, 1:] = [[[1, 2], [3, 0]]] * routes.shape[0]
    answer = {"text": "...", "meta_info": {"prompt_tokens": prompt, "completion_tokens": completion,
                                           "routed_experts": base64.b64encode(routes.tobytes()).decode()}}
    trace = from_sglang_routed_experts([answer, answer], num_layers=LAYERS, top_k=TOP_K, num_experts=EXPERTS)
    assert trace.num_tokens == 2 * routes.shape[0] and trace.sequence_ids.tolist() == [0, 1]
    assert np.all(trace.experts[:, 0] == -1) and trace.layers.tolist() == [1, 2]
    assert trace.phase[:5].tolist() == [PREFILL] * prompt + [DECODE] * (completion - 1)
    tail = {"meta_info": {**answer["meta_info"],
                          "routed_experts": base64.b64encode(routes[2:].tobytes()).decode()}}  # start_len = 2
    partial = from_sglang_routed_experts([tail], num_layers=LAYERS, top_k=TOP_K, num_experts=EXPERTS, start_len=2)
    assert partial.pos.tolist() == [2, 3, 4] and partial.phase.tolist() == [PREFILL, DECODE, DECODE]
    bad = {"meta_info": {**answer["meta_info"], "completion_tokens": 9}}
    with pytest.raises(TraceError, match="expected"):
        from_sglang_routed_experts([bad], num_layers=LAYERS, top_k=TOP_K, num_experts=EXPERTS)


def test_vllm_server_response_with_split_prompt_and_generated_routing():
    prompt = [[[0, 1], [2, 3], [1, 3]], [[1, 2], [0, 3], [2, 1]]]
    generated = [[[3, 2], [1, 0], [0, 2]]]
    response = json.loads(json.dumps({  # as the OpenAI-compatible server sends it
        "prompt_routed_experts": prompt, "prompt_token_ids": [7, 8],
        "choices": [{"index": 0, "text": "x", "token_ids": [9], "routed_experts": generated}],
    }))
    trace = from_vllm_outputs([response], num_experts=EXPERTS)
    assert trace.experts.tolist() == prompt + generated
    assert trace.phase.tolist() == [PREFILL, PREFILL, DECODE] and trace.token_ids.tolist() == [7, 8, 9]


def test_vllm_offline_outputs_with_joined_routing_blank_dense_layers():
    routes = np.zeros((4, LAYERS, TOP_K), dtype=np.uint16)  # prompt 3 + generated 2 - 1 rows; layer 0 dense
    routes[:, 1:] = [[2, 1], [0, 3]]
    output = SimpleNamespace(prompt_token_ids=[5, 6, 7], outputs=[
        SimpleNamespace(token_ids=[8, 9], routed_experts=routes),
        SimpleNamespace(token_ids=[8, 4], routed_experts=routes),
    ])
    trace = from_vllm_outputs([output], num_experts=EXPERTS)
    assert trace.sequence_ids.tolist() == [0, 1] and trace.num_tokens == 8
    assert np.all(trace.experts[:, 0] == -1) and np.all(trace.experts[:, 2] == [0, 3])
    assert trace.phase[:4].tolist() == [PREFILL] * 3 + [DECODE]
    assert trace.token_ids[:4].tolist() == [5, 6, 7, 8]
    output.outputs[0].token_ids = [8]
    with pytest.raises(TraceError, match="rows"):
        from_vllm_outputs([output], num_experts=EXPERTS)


def test_transformers_router_logits_give_top_k_with_padding_dropped():
    batch, seq_len = 2, 3
    logits = torch.full((batch * seq_len, EXPERTS), -5.0)
    logits[torch.arange(batch * seq_len), torch.arange(batch * seq_len) % EXPERTS] = 5.0  # top-1
    logits[torch.arange(batch * seq_len), (torch.arange(batch * seq_len) + 1) % EXPERTS] = 4.0  # top-2
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])  # row 1 is left-padded
    trace = from_router_logits((logits, None, logits.view(batch, seq_len, EXPERTS)), top_k=TOP_K,
                               batch_size=batch, attention_mask=mask, input_ids=torch.arange(6).view(2, 3),
                               prompt_lengths=[2, 1], layer_ids=[1, 2, 3])
    assert trace.num_tokens == 5 and trace.layer_ids.tolist() == [1, 2, 3]
    assert trace.experts[0, 0].tolist() == [0, 1] and np.all(trace.experts[:, 1] == -1)
    assert trace.experts[3, 2].tolist() == [0, 1]  # batch row 1, first real token = flat row 4
    assert trace.pos.tolist() == [0, 1, 2, 0, 1] and trace.token_ids.tolist() == [0, 1, 2, 4, 5]
    assert trace.phase.tolist() == [PREFILL, PREFILL, DECODE, PREFILL, DECODE]
    assert trace.weights[0, 0, 0] > trace.weights[0, 0, 1] > 0


def test_trace_recorder_builds_the_trace_of_recorded_steps():
    recorder = TraceRecorder(num_layers=2, num_experts=EXPERTS, top_k=TOP_K, layer_ids=[3, 7])
    recorder.begin_step(seq_ids=[0, 0, 1], positions=[0, 1, 0], phase=[PREFILL] * 3, token_ids=[1, 2, 3])
    buffer = torch.tensor([[0, 1], [2, 3], [1, 2]])
    recorder.record(0, buffer)
    buffer.fill_(0)  # engines reuse their buffers: the recorder must have copied
    recorder.record(1, np.array([[3, 2], [1, 0], [0, 1]]))
    recorder.begin_step(seq_ids=[1, 0], positions=[1, 2], phase=[DECODE] * 2, token_ids=[4, 5])
    recorder.record(1, torch.tensor([[2, 0], [3, 1]]))
    trace = recorder.build()
    assert trace.seq_id.tolist() == [0, 0, 0, 1, 1] and trace.pos.tolist() == [0, 1, 2, 0, 1]
    assert trace.experts[0].tolist() == [[0, 1], [3, 2]]
    assert trace.experts[2].tolist() == [[-1, -1], [3, 1]]  # layer 0 not recorded in the decode step
    assert trace.token_ids.tolist() == [1, 2, 5, 3, 4] and trace.layer_ids.tolist() == [3, 7]
    with pytest.raises(TraceError, match="twice"):
        recorder.record(1, torch.tensor([[2, 0], [3, 1]]))
