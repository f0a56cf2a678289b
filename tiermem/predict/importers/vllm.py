"""Importer for vLLM's ``--enable-return-routed-experts`` output (offline ``LLM.generate`` or the server).

vLLM documents no file format; the routing rides on the outputs, in two shapes across versions:

- **Split** (documented in vLLM 0.21 "Routed Experts Replay"): the request carries
  ``prompt_routed_experts`` ``[prompt_len, num_moe_layers, top_k]`` and every completion carries
  ``routed_experts`` ``[gen_len, num_moe_layers, top_k]``; int16 ids. The OpenAI server returns them as
  nested lists (``resp["prompt_routed_experts"]``, ``resp["choices"][i]["routed_experts"]``); offline
  they are arrays on ``RequestOutput`` / ``CompletionOutput``.
- **Joined** (the first implementation, vLLM PR 28284): only ``CompletionOutput.routed_experts``,
  ``[prompt_len + gen_len - 1, num_hidden_layers, top_k]`` (the last sampled token is never fed back),
  with layers without experts left zero-filled.

Both are accepted, as objects (attributes) or as dicts (keys). Invariants: every completion becomes one
sequence holding the prompt rows (prefill) then the generated rows (decode); a row of generated token
j is aligned with position ``prompt_len + j``; zero-filled (repeated-id) layers become -1.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from tiermem.errors import TraceError
from tiermem.predict.importers.rows import RowBuilder, blank_unrouted
from tiermem.predict.trace import DECODE, PREFILL, RouteTrace


def _get(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)


def _array(value: Any, what: str) -> np.ndarray:
    array = np.asarray(value)
    if array.ndim != 3:
        raise TraceError(f"vllm importer: {what} must be [tokens, layers, top_k], got shape {array.shape}")
    return array


def from_vllm_outputs(
    outputs: Iterable[Any], *, num_experts: int, model: str = "", moe_layers: Sequence[int] | None = None,
) -> RouteTrace:
    """Build a trace from ``RequestOutput`` objects or OpenAI completion responses (dicts)."""
    builder: RowBuilder | None = None
    seq = 0
    for number, output in enumerate(outputs):
        completions = _get(output, "outputs") if _get(output, "outputs") is not None else _get(output, "choices")
        if not completions:
            raise TraceError(f"vllm importer: output {number} has neither 'outputs' nor 'choices'")
        prompt_routes = _get(output, "prompt_routed_experts")
        prompt_ids = _get(output, "prompt_token_ids")
        for completion in completions:
            routes = _get(completion, "routed_experts")
            if routes is None:
                raise TraceError(
                    f"vllm importer: a completion of output {number} has no routed_experts; start vLLM with "
                    f"--enable-return-routed-experts"
                )
            experts, prompt_len, tokens = _rows(_array(routes, "routed_experts"), prompt_routes, prompt_ids,
                                                _get(completion, "token_ids"), number)
            experts = blank_unrouted(experts, moe_layers)
            if builder is None:
                builder = RowBuilder(num_layers=experts.shape[1], top_k=experts.shape[2])
            positions = np.arange(experts.shape[0])
            builder.add(seq=np.full(positions.size, seq), pos=positions, experts=experts,
                        phase=np.where(positions < prompt_len, PREFILL, DECODE), token_ids=tokens)
            seq += 1
    if builder is None:
        raise TraceError("vllm importer: no outputs were given")
    return builder.build(num_experts=num_experts, model=model, source="vllm return_routed_experts")


def _rows(routes: np.ndarray, prompt_routes: Any, prompt_ids: Any, output_ids: Any,
          number: int) -> tuple[np.ndarray, int, np.ndarray | None]:
    """Experts of every row, the prompt length, and the input token id of every row if known."""
    prompt_ids = None if prompt_ids is None else list(prompt_ids)
    output_ids = None if output_ids is None else list(output_ids)
    if prompt_routes is not None:
        prompt = _array(prompt_routes, "prompt_routed_experts")
        if prompt.shape[1:] != routes.shape[1:]:
            raise TraceError(
                f"vllm importer: output {number}: prompt_routed_experts {prompt.shape} and routed_experts "
                f"{routes.shape} disagree on layers x top_k"
            )
        experts = np.concatenate([prompt, routes])
        tokens = None
        if prompt_ids is not None and output_ids is not None and len(output_ids) == routes.shape[0]:
            tokens = np.asarray(prompt_ids + output_ids, dtype=np.int64)
        return experts, prompt.shape[0], tokens
    if prompt_ids is None:
        raise TraceError(
            f"vllm importer: output {number} has joined routed_experts but no prompt_token_ids to tell prompt "
            f"rows from generated ones"
        )
    prompt_len = len(prompt_ids)
    if output_ids is not None and routes.shape[0] != prompt_len + len(output_ids) - 1:
        raise TraceError(
            f"vllm importer: output {number}: routed_experts has {routes.shape[0]} rows, expected prompt "
            f"{prompt_len} + generated {len(output_ids)} - 1 = {prompt_len + len(output_ids) - 1}"
        )
    tokens = None
    if output_ids is not None:
        tokens = np.asarray((prompt_ids + output_ids)[: routes.shape[0]], dtype=np.int64)
    return routes, prompt_len, tokens
