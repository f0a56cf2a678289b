"""End-to-end: one model served all-HBM, with ``--expert-tier cxl`` and with SGLang's ``--enable-paged-experts``
at the same HBM budget (K slots per layer), in one run; same requests, greedy; outputs compared with all-HBM.

Each phase starts ``python -m sglang.launch_server`` (plugins load there), waits for it, sends the same
token-id requests at a fixed concurrency, records output ids and wall time, and stops the server. The
``predictor`` phase first collects a routing trace from the all-HBM server (``--enable-return-routed-
experts``) on other prompts, then serves ``--expert-tier cxl --expert-tier-predictor trace.npz``.
Results: ``OUT/e2e.json`` (per phase: output tokens/s, request latency, match with all-HBM) and each
server's log tail. Every request loop is bounded (count and timeout); servers listen on 127.0.0.1 only.

    python e2e.py MODEL_DIR OUT_DIR [--slots 32] [--phases hbm,tiermem,paged,predictor]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tiermem.predict.importers import from_sglang_routed_experts
from tiermem.predict.trace import save_trace

PORT = 31000
STARTUP_TIMEOUT_S = 900
REQUEST_TIMEOUT_S = 600
COMMON = ["--skip-tokenizer-init", "--attention-backend", "triton", "--sampling-backend", "pytorch",
          "--cuda-graph-backend-decode", "disabled", "--cuda-graph-backend-prefill", "disabled",
          "--disable-radix-cache", "--mem-fraction-static", "0.5", "--context-length", "2048",
          "--host", "127.0.0.1", "--port", str(PORT), "--log-level", "info"]


def phase_flags(phase: str, slots: int, trace: Path) -> list[str]:
    return {
        "hbm": [],
        "tiermem": ["--expert-tier", "cxl", "--expert-tier-slots", str(slots)],
        "paged": ["--enable-paged-experts", "--paged-experts-num-resident", str(slots)],
        "predictor": ["--expert-tier", "cxl", "--expert-tier-slots", str(slots), "--expert-tier-predictor", str(trace)],
    }[phase]


def post(path: str, body: dict) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{PORT}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
        return json.loads(response.read())


def start(model: Path, flags: list[str], log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "TIERMEM_SGLANG_CONFIG"}
    server = subprocess.Popen([sys.executable, "-m", "sglang.launch_server", "--model-path", str(model), *COMMON,
                               *flags], stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                              start_new_session=True)
    deadline = time.time() + STARTUP_TIMEOUT_S
    while time.time() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"server exited with {server.returncode} during start-up; see {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/health", timeout=5) as response:
                if response.status == 200:
                    return server
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(2)
    stop(server)
    raise RuntimeError(f"server not healthy after {STARTUP_TIMEOUT_S} s; see {log}")


def stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def generate(prompts: list[list[int]], new_tokens: int, concurrency: int, *, routes: bool = False) -> dict:
    def one(ids: list[int]) -> tuple[dict, float]:
        start_s = time.perf_counter()
        answer = post("/generate", {"input_ids": ids, "return_routed_experts": routes,
                                    "sampling_params": {"max_new_tokens": new_tokens, "temperature": 0.0,
                                                        "ignore_eos": True}})
        return answer, time.perf_counter() - start_s

    start_s = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="e2e-client") as pool:
        answers = list(pool.map(one, prompts))
    wall_s = time.perf_counter() - start_s
    outputs = [a["output_ids"] for a, _ in answers]
    latencies = [s for _, s in answers]
    return {"outputs": outputs, "wall_s": wall_s, "output_tokens": sum(len(o) for o in outputs),
            "output_tokens_per_s": sum(len(o) for o in outputs) / wall_s,
            "latency_s_p50": float(np.percentile(latencies, 50)), "latency_s_p90": float(np.percentile(latencies, 90)),
            "answers": [a for a, _ in answers] if routes else None}


def match(outputs: list[list[int]], reference: list[list[int]]) -> dict:
    prefixes = []
    for got, want in zip(outputs, reference):
        same = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        prefixes.append(same)
    return {"identical_requests": sum(g == w for g, w in zip(outputs, reference)), "requests": len(reference),
            "mean_common_prefix_tokens": float(np.mean(prefixes))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--slots", type=int, default=32)
    parser.add_argument("--phases", default="hbm,tiermem,paged,predictor")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    config = json.loads((args.model / "config.json").read_text())
    rng = np.random.default_rng(0)
    prompts = rng.integers(100, config["vocab_size"], (args.requests, args.prompt_tokens)).tolist()
    trace_prompts = rng.integers(100, config["vocab_size"], (16, args.prompt_tokens)).tolist()
    trace_path = args.out / "trace.npz"
    results: dict = {"model": config, "slots": args.slots, "requests": args.requests,
                     "concurrency": args.concurrency, "prompt_tokens": args.prompt_tokens,
                     "new_tokens": args.new_tokens, "phases": {}}
    phases = args.phases.split(",")
    for phase in phases:
        log = args.out / f"server-{phase}.log"
        extra = ["--enable-return-routed-experts"] if phase == "hbm" and "predictor" in phases else []
        try:
            server = start(args.model, phase_flags(phase, args.slots, trace_path) + extra, log)
        except RuntimeError as error:
            results["phases"][phase] = {"error": str(error)}
            print(f"{phase}: {error}", flush=True)
            continue
        try:
            generate(prompts[:2], 8, 2)  # warm-up
            run = generate(prompts, args.new_tokens, args.concurrency)
            if extra:
                collected = generate(trace_prompts, args.new_tokens, args.concurrency, routes=True)["answers"]
                trace = from_sglang_routed_experts(collected, num_layers=config["num_hidden_layers"],
                                                   top_k=config["num_experts_per_tok"],
                                                   num_experts=config["num_experts"], model="random qwen3-moe")
                save_trace(trace, trace_path)
        finally:
            stop(server)
        reference = results["phases"].get("hbm", {}).get("outputs")
        summary = {k: v for k, v in run.items() if k != "answers"}
        if reference is not None and phase != "hbm":
            summary["match_vs_hbm"] = match(run["outputs"], reference)
        results["phases"][phase] = summary
        print(f"{phase}: {summary['output_tokens_per_s']:.1f} output tok/s, p50 {summary['latency_s_p50']:.2f} s"
              + (f", match {summary['match_vs_hbm']}" if "match_vs_hbm" in summary else ""), flush=True)
    (args.out / "e2e.json").write_text(json.dumps(results, indent=1))
    return 0 if all("error" not in p for p in results["phases"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
