"""Routing traces from SGLang's return_routed_experts: payload decoding, the trace built, a bounded
collection from a loopback server that answers as SGLang does (no sglang needed)."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from tiermem.errors import TraceError
from tiermem.predict.trace import DECODE, PREFILL, load_trace

from tiermem_sglang.collect import build_trace, collect, main, routes_from_payload

NUM_LAYERS = 3
TOP_K = 2
NUM_EXPERTS = 6
PROMPT_TOKENS = 4
NEW_TOKENS = 3


def routed(rows: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([[rng.choice(NUM_EXPERTS, TOP_K, replace=False) for _ in range(NUM_LAYERS)] for _ in range(rows)])


def payload(ids: np.ndarray) -> str:
    return base64.b64encode(ids.astype(np.int32).tobytes()).decode()


def test_a_payload_decodes_into_rows_of_layers_by_top_k():
    ids = routed(PROMPT_TOKENS + NEW_TOKENS - 1, seed=0)
    routes = routes_from_payload(payload(ids), num_layers=NUM_LAYERS, top_k=TOP_K, prompt_tokens=PROMPT_TOKENS)
    assert routes.experts.dtype == np.int16 and np.array_equal(routes.experts, ids)


def test_a_payload_of_the_wrong_shape_raises_naming_the_shape():
    with pytest.raises(TraceError, match="not a whole number of rows of 3 layers x 2 experts"):
        routes_from_payload(payload(np.arange(7)), num_layers=NUM_LAYERS, top_k=TOP_K, prompt_tokens=1)


def test_prompt_rows_are_prefill_and_the_rest_decode():
    first = routes_from_payload(payload(routed(6, 1)), num_layers=NUM_LAYERS, top_k=TOP_K, prompt_tokens=PROMPT_TOKENS)
    second = routes_from_payload(payload(routed(5, 2)), num_layers=NUM_LAYERS, top_k=TOP_K, prompt_tokens=2)
    trace = build_trace([first, second], num_experts=NUM_EXPERTS, model="tiny")
    assert trace.seq_id.tolist() == [0] * 6 + [1] * 5
    assert trace.pos.tolist() == list(range(6)) + list(range(5))
    assert trace.phase.tolist() == [PREFILL] * 4 + [DECODE] * 2 + [PREFILL] * 2 + [DECODE] * 3


class FakeSglang(BaseHTTPRequestHandler):
    """Answers /generate the way SGLang does with --enable-return-routed-experts."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert body["return_routed_experts"] and body["sampling_params"]["max_new_tokens"] == NEW_TOKENS
        seed = len(body["text"])
        answer = {"text": "...", "meta_info": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": NEW_TOKENS,
                                               "routed_experts": payload(routed(PROMPT_TOKENS + NEW_TOKENS - 1, seed))}}
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeSglang)
    thread = threading.Thread(target=server.serve_forever, name="fake-sglang", daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


def test_collect_saves_a_trace_that_loads_back_unchanged(server_url, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a\nbb\n\nccc\n")
    out = tmp_path / "trace.npz"
    assert main(["--url", server_url, "--prompts", str(prompts), "--num-layers", str(NUM_LAYERS),
                 "--top-k", str(TOP_K), "--num-experts", str(NUM_EXPERTS), "--max-new-tokens", str(NEW_TOKENS),
                 "--out", str(out)]) == 0
    trace = load_trace(out)
    direct = collect(server_url, ["a", "bb", "ccc"], num_layers=NUM_LAYERS, top_k=TOP_K, num_experts=NUM_EXPERTS,
                     max_new_tokens=NEW_TOKENS)
    assert trace.num_tokens == 3 * (PROMPT_TOKENS + NEW_TOKENS - 1)
    assert np.array_equal(trace.experts, direct.experts)
    assert np.array_equal(trace.experts[:6], routed(6, seed=1))
