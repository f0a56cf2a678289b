"""Routing traces from a running SGLang server, in tiermem's trace format (``tiermem.predict.trace``).

The server must run with ``--enable-return-routed-experts``. Each ``/generate`` request asks for
``return_routed_experts``; SGLang answers with ``meta_info["routed_experts"]``: base64 of int32
``[prompt + output - 1, layers, top_k]`` expert ids (the last sampled token is never run through the
model). ``routes_from_payload`` turns one answer into rows; ``collect`` sends a bounded list of prompts,
one sequence each, and returns one ``RouteTrace``; ``python -m tiermem_sglang.collect`` saves it.

Invariants: rows are in (sequence, position) order; a row is PREFILL for positions inside the prompt and
DECODE after; ids outside ``[0, num_experts)`` raise (the trace checks), never silently dropped.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import sys
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tiermem.errors import TraceError
from tiermem.predict.trace import DECODE, PREFILL, RouteTrace, save_trace

log = logging.getLogger("tiermem.sglang")


@dataclass(frozen=True)
class SequenceRoutes:
    """The routing of one finished request: ``experts`` int16 ``[rows, layers, top_k]``."""

    experts: np.ndarray
    prompt_tokens: int


def routes_from_payload(payload: str, *, num_layers: int, top_k: int, prompt_tokens: int) -> SequenceRoutes:
    """Decode one ``meta_info["routed_experts"]`` string into ``[rows, num_layers, top_k]`` ids."""
    ids = np.frombuffer(base64.b64decode(payload), dtype=np.int32)
    per_row = num_layers * top_k
    if ids.size % per_row:
        raise TraceError(
            f"sglang routes: {ids.size} ids are not a whole number of rows of {num_layers} layers x {top_k} experts; "
            "check --num-layers (every layer of the model, dense ones included) and --top-k"
        )
    return SequenceRoutes(ids.reshape(-1, num_layers, top_k).astype(np.int16), prompt_tokens)


def build_trace(sequences: Sequence[SequenceRoutes], *, num_experts: int, model: str = "") -> RouteTrace:
    """One trace of every sequence, ``seq_id`` in the given order; layers without MoE routing stay -1."""
    if not sequences:
        raise TraceError("sglang routes: no sequence to build a trace from")
    experts = np.concatenate([s.experts for s in sequences])
    seq_id = np.concatenate([np.full(len(s.experts), i, dtype=np.int32) for i, s in enumerate(sequences)])
    pos = np.concatenate([np.arange(len(s.experts), dtype=np.int32) for s in sequences])
    phase = np.concatenate([
        np.where(np.arange(len(s.experts)) < s.prompt_tokens, PREFILL, DECODE).astype(np.uint8) for s in sequences
    ])
    return RouteTrace(experts=experts, seq_id=seq_id, pos=pos, phase=phase, num_experts=num_experts, model=model,
                      source="sglang return_routed_experts")


def collect(url: str, prompts: Sequence[str], *, num_layers: int, top_k: int, num_experts: int,
            max_new_tokens: int = 64, timeout_s: float = 120.0, model: str = "") -> RouteTrace:
    """Send each prompt to ``url``'s ``/generate`` (greedy) and return the routing of all of them."""
    sequences = []
    for prompt in prompts:
        body = {"text": prompt, "return_routed_experts": True,
                "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0.0}}
        answer = _post(f"{url.rstrip('/')}/generate", body, timeout_s)
        meta = answer["meta_info"]
        if "routed_experts" not in meta:
            raise TraceError(f"sglang routes: {url} returned no routed_experts; start it with "
                             "--enable-return-routed-experts")
        sequences.append(routes_from_payload(meta["routed_experts"], num_layers=num_layers, top_k=top_k,
                                             prompt_tokens=int(meta["prompt_tokens"])))
    return build_trace(sequences, num_experts=num_experts, model=model)


def _post(url: str, body: dict, timeout_s: float) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.loads(response.read())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tiermem_sglang.collect",
                                     description="Collect a routing trace (.npz) from a running SGLang server.")
    parser.add_argument("--url", default="http://127.0.0.1:30000")
    parser.add_argument("--prompts", required=True, help="text file, one prompt per line")
    parser.add_argument("--num-layers", type=int, required=True, help="decoder layers of the model")
    parser.add_argument("--top-k", type=int, required=True, help="experts per token (num_experts_per_tok)")
    parser.add_argument("--num-experts", type=int, required=True, help="routed experts per layer")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--model", default="")
    parser.add_argument("--out", required=True, help="output .npz")
    args = parser.parse_args(argv)
    with open(args.prompts) as handle:
        prompts = [line.rstrip("\n") for line in handle if line.strip()]
    trace = collect(args.url, prompts, num_layers=args.num_layers, top_k=args.top_k, num_experts=args.num_experts,
                    max_new_tokens=args.max_new_tokens, model=args.model)
    save_trace(trace, args.out)
    print(f"{args.out}: {trace.num_tokens} tokens, {trace.sequence_ids.size} sequences, "
          f"{trace.num_layers} layers x top-{trace.top_k} of {trace.num_experts} experts", file=sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
