"""End-to-end: one model served all-HBM, with ``--expert-tier cxl`` and with SGLang's ``--enable-paged-experts``
at the same HBM budget (K slots per layer), in one run; same requests, greedy; outputs compared with all-HBM.

Phases: ``hbm``, ``tiermem`` (``--expert-tier-pager host``), ``device`` (``--expert-tier-pager device``),
``paged``, ``predictor`` (host pager prefetching with a predictor fitted on a trace ``hbm`` collects) and
``device-predictor`` (device pager evicting by that trace's step table), each eager (decode CUDA graphs
disabled) or, as ``NAME+graph``, with decode CUDA graphs captured up to ``--graph-max-bs`` requests
(default ``K // top_k``, the most SGLang's paged experts captures; ``phase_flags``); graph phases also
compare with ``hbm+graph``.

Each phase starts ``python -m sglang.launch_server`` (plugins load there), waits for it, sends the same
token-id requests at a fixed concurrency, records output ids and wall time, and stops the server. The
``predictor`` phase first collects a routing trace from the all-HBM server (``--enable-return-routed-
experts``) on other prompts, then serves ``--expert-tier cxl --expert-tier-predictor trace.npz``.
Results: ``OUT/e2e.json`` (per phase: start-up seconds, output tokens/s, request latency, match with
all-HBM), rewritten after every phase so a run stopped at its time limit keeps the phases it finished,
and each server's log tail. Every request loop is bounded (count and timeout); servers listen on
127.0.0.1 only.

A run may be split over several device calls: a later call without ``hbm`` compares against an
earlier call's ``e2e.json`` (``--reference``) and fits its predictor from that call's trace
(``--trace``, collected by an ``hbm`` phase run with ``--collect-trace`` or beside ``predictor``);
the random checkpoint is seeded, so each call writes the same weights.

    python e2e.py MODEL_DIR OUT_DIR [--slots 32] [--phases hbm,tiermem,device,paged,predictor,hbm+graph,...]
                  [--graph-max-bs N]
                  [--reference EARLIER/e2e.json --trace EARLIER/trace.npz]
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
REQUEST_TIMEOUT_S = 300
STOP_TIMEOUT_S = 20
PHASES = ("hbm", "tiermem", "device", "paged", "predictor", "device-predictor")  # each also as NAME+graph
TRACED = ("predictor", "device-predictor")  # phases that read the routing trace hbm collects
COMMON = ["--skip-tokenizer-init", "--attention-backend", "triton", "--sampling-backend", "pytorch",
          "--cuda-graph-backend-prefill", "disabled", "--disable-radix-cache", "--mem-fraction-static", "0.5",
          "--context-length", "2048",
          "--host", "127.0.0.1", "--port", str(PORT), "--log-level", "info"]


def phase_flags(phase: str, slots: int, top_k: int, trace: Path, graph_max_bs: int = 0) -> list[str]:
    """A phase's server flags. ``NAME+graph`` captures decode in CUDA graphs up to ``graph_max_bs`` requests
    (0: ``slots // top_k``, the batches whose routed entries fit the slots, the most SGLang's paged experts
    captures; it caps itself there whatever is asked): full graphs, except the host pager's breakable ones (it
    pages in an eager break)."""
    name, graph = phase.removesuffix("+graph"), phase.endswith("+graph")
    tiered = ["--expert-tier", "cxl", "--expert-tier-slots", str(slots)]
    flags = {  # PHASES names these keys
        "hbm": [],
        "tiermem": [*tiered, "--expert-tier-pager", "host"],
        "device": [*tiered, "--expert-tier-pager", "device"],
        "paged": ["--enable-paged-experts", "--paged-experts-num-resident", str(slots)],
        "predictor": [*tiered, "--expert-tier-pager", "host", "--expert-tier-predictor", str(trace)],
        "device-predictor": [*tiered, "--expert-tier-pager", "device", "--expert-tier-predictor", str(trace)],
    }[name]
    if not graph:
        return [*flags, "--cuda-graph-backend-decode", "disabled"]
    backend = "breakable" if name in ("tiermem", "predictor") else "full"
    return [*flags, "--cuda-graph-backend-decode", backend,
            "--cuda-graph-max-bs-decode", str(graph_max_bs or max(1, slots // top_k))]


def post(path: str, body: dict) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{PORT}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
        return json.loads(response.read())


def start(model: Path, flags: list[str], log: Path, timeout_s: float) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "TIERMEM_SGLANG_CONFIG"}
    server = subprocess.Popen([sys.executable, "-m", "sglang.launch_server", "--model-path", str(model), *COMMON,
                               *flags], stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                              start_new_session=True)
    deadline = time.time() + timeout_s
    try:
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
        raise RuntimeError(f"server not healthy after {timeout_s:.0f} s; see {log}")
    except BaseException:  # not healthy, or this process told to stop: the server must not outlive it
        stop(server)
        raise


def stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=STOP_TIMEOUT_S)
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
    parser.add_argument("--phases", default="hbm,device,paged,tiermem",
                        help="comma-separated: hbm, device, tiermem, paged, predictor, each optionally NAME+graph")
    parser.add_argument("--graph-max-bs", type=int, default=0,
                        help="largest decode batch the +graph phases capture (0: slots // top_k)")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--startup-timeout-s", type=float, default=300.0)
    parser.add_argument("--reference", type=Path, default=None,
                        help="an earlier run's e2e.json whose hbm outputs are the reference when hbm is not run")
    parser.add_argument("--trace", type=Path, default=None,
                        help="routing trace for the predictor phase (default OUT/trace.npz, collected by hbm)")
    parser.add_argument("--collect-trace", action="store_true",
                        help="collect the routing trace in hbm even without a predictor phase (for a later call)")
    args = parser.parse_args(argv)
    phases = args.phases.split(",")
    unknown = [p for p in phases if p.removesuffix("+graph") not in PHASES]
    if unknown:
        parser.error(f"unknown phase(s) {unknown}; known: {', '.join(PHASES)}, each optionally NAME+graph")
    args.out.mkdir(parents=True, exist_ok=True)
    # A time limit's SIGTERM unwinds like an exception, so the running phase still stops its server
    # (started in its own session, it would outlive this process and hold the GPU).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    config = json.loads((args.model / "config.json").read_text())
    rng = np.random.default_rng(0)
    prompts = rng.integers(100, config["vocab_size"], (args.requests, args.prompt_tokens)).tolist()
    trace_prompts = rng.integers(100, config["vocab_size"], (16, args.prompt_tokens)).tolist()
    trace_path = args.trace or args.out / "trace.npz"
    results: dict = {"model": config, "slots": args.slots, "graph_max_bs": args.graph_max_bs or max(
                         1, args.slots // config["num_experts_per_tok"]), "requests": args.requests,
                     "concurrency": args.concurrency, "prompt_tokens": args.prompt_tokens,
                     "new_tokens": args.new_tokens, "phases": {}}
    reference = graph_reference = None  # outputs of hbm, and of hbm+graph (graph phases compare with both)
    if "hbm" not in phases and args.reference is not None:
        earlier = json.loads(args.reference.read_text())
        if (earlier["model"], earlier["requests"], earlier["prompt_tokens"], earlier["new_tokens"]) != (
                config, args.requests, args.prompt_tokens, args.new_tokens):
            parser.error(f"{args.reference} was run on another model or workload; rerun hbm instead")
        reference = earlier["phases"]["hbm"]["outputs"]
    traced = any(p.removesuffix("+graph") in TRACED for p in phases)
    if traced and "hbm" not in phases and not trace_path.is_file():
        parser.error(f"the {', '.join(TRACED)} phases need a routing trace: run hbm first or pass --trace "
                     f"(no {trace_path})")
    for phase in phases:
        log = args.out / f"server-{phase.replace('+', '-')}.log"
        collect = phase == "hbm" and (traced or args.collect_trace)
        extra = ["--enable-return-routed-experts"] if collect else []
        start_s = time.perf_counter()
        try:
            flags = phase_flags(phase, args.slots, config["num_experts_per_tok"], trace_path, args.graph_max_bs)
            server = start(args.model, flags + extra, log, args.startup_timeout_s)
        except RuntimeError as error:
            results["phases"][phase] = {"error": str(error)}
            print(f"{phase}: {error}", flush=True)
            (args.out / "e2e.json").write_text(json.dumps(results, indent=1))
            continue
        startup_s = time.perf_counter() - start_s
        try:
            # Warm-up at the run's concurrency: requests finishing at different times visit every decode batch
            # size and prefill shape the run will, so no phase pays Triton's compile-on-first-shape inside it.
            generate(prompts[:2 * args.concurrency], 16, args.concurrency)
            run = generate(prompts, args.new_tokens, args.concurrency)
            if extra:
                collected = generate(trace_prompts, args.new_tokens, args.concurrency, routes=True)["answers"]
                trace = from_sglang_routed_experts(collected, num_layers=config["num_hidden_layers"],
                                                   top_k=config["num_experts_per_tok"],
                                                   num_experts=config.get("num_experts", config.get("num_local_experts")),
                                                   model="random qwen3-moe")
                save_trace(trace, trace_path)
        except (OSError, KeyError, ValueError) as error:  # a failed request (urllib errors are OSErrors)
            results["phases"][phase] = {"startup_s": startup_s, "error": f"{type(error).__name__}: {error}"}
            print(f"{phase}: requests failed: {error}; see {log}", flush=True)
            (args.out / "e2e.json").write_text(json.dumps(results, indent=1))
            continue
        finally:
            stop(server)
        if phase == "hbm":
            reference = run["outputs"]
        if phase == "hbm+graph":
            graph_reference = run["outputs"]
        summary = {"startup_s": startup_s, **{k: v for k, v in run.items() if k != "answers"}}
        if reference is not None and phase != "hbm":
            summary["match_vs_hbm"] = match(run["outputs"], reference)
        if graph_reference is not None and phase.endswith("+graph") and phase != "hbm+graph":
            summary["match_vs_hbm_graph"] = match(run["outputs"], graph_reference)
        results["phases"][phase] = summary
        (args.out / "e2e.json").write_text(json.dumps(results, indent=1))
        print(f"{phase}: start-up {startup_s:.0f} s, {summary['output_tokens_per_s']:.1f} output tok/s, "
              f"p50 {summary['latency_s_p50']:.2f} s"
              + "".join(f", {key} {summary[key]}" for key in ("match_vs_hbm", "match_vs_hbm_graph") if key in summary),
              flush=True)
    return 0 if all("error" not in p for p in results["phases"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
