"""Routing traces from a running server: a bounded collection from a loopback server that answers as
SGLang does with --enable-return-routed-experts, saved and loaded back (no sglang needed). Decoding the
payload itself is tiermem.predict.importers' job and tested there."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from tiermem.errors import TraceError
from tiermem.predict.trace import DECODE, PREFILL, load_trace

from tiermem_sglang.collect import collect, main

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


class FakeSglang(BaseHTTPRequestHandler):
    """Answers /generate the way SGLang does with --enable-return-routed-experts."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert body["return_routed_experts"] and body["sampling_params"]["max_new_tokens"] == NEW_TOKENS
        if body["text"] == "unrouted":
            answer = {"text": "...", "meta_info": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": NEW_TOKENS}}
            self.answer(answer)
            return
        seed = len(body["text"])
        answer = {"text": "...", "meta_info": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": NEW_TOKENS,
                                               "routed_experts": payload(routed(PROMPT_TOKENS + NEW_TOKENS - 1, seed))}}
        self.answer(answer)

    def answer(self, answer: dict) -> None:
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
    rows = PROMPT_TOKENS + NEW_TOKENS - 1
    assert trace.phase[:rows].tolist() == [PREFILL] * PROMPT_TOKENS + [DECODE] * (NEW_TOKENS - 1)


def test_a_server_without_routed_experts_is_named_with_the_fix(server_url):
    with pytest.raises(TraceError, match="--enable-return-routed-experts"):
        collect(server_url, ["unrouted"], num_layers=NUM_LAYERS, top_k=TOP_K, num_experts=NUM_EXPERTS,
                max_new_tokens=NEW_TOKENS)
