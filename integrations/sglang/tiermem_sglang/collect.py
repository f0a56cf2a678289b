"""Routing traces from a running SGLang server, in tiermem's trace format (``tiermem.predict.trace``).

The server must run with ``--enable-return-routed-experts``. ``collect`` sends a bounded list of prompts
(greedy, one sequence each) to ``/generate`` with ``return_routed_experts`` and turns the answers into
one ``RouteTrace`` with tiermem's importer (``tiermem.predict.importers.from_sglang_routed_experts``:
base64 int32 ``[prompt + output - 1, layers, top_k]`` per answer, prompt rows PREFILL, the rest DECODE,
zero-filled dense layers blanked). ``python -m tiermem_sglang.collect`` saves it as ``.npz``, the file
``--expert-tier-predictor`` reads.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from collections.abc import Sequence

from tiermem.predict.importers import from_sglang_routed_experts
from tiermem.predict.trace import RouteTrace, save_trace


def collect(url: str, prompts: Sequence[str | Sequence[int]], *, num_layers: int, top_k: int, num_experts: int,
            max_new_tokens: int = 64, timeout_s: float = 120.0, model: str = "") -> RouteTrace:
    """Send each prompt (text, or token ids) to ``url``'s ``/generate`` and return the routing of all of them."""
    answers = []
    for prompt in prompts:
        body = {"text": prompt} if isinstance(prompt, str) else {"input_ids": list(prompt)}
        body.update({"return_routed_experts": True,
                     "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0.0}})
        answers.append(_post(f"{url.rstrip('/')}/generate", body, timeout_s))
    return from_sglang_routed_experts(answers, num_layers=num_layers, top_k=top_k, num_experts=num_experts,
                                      model=model)


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
