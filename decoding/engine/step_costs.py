"""What a verify pass of k tokens and a drafting call of depth d cost on this engine, as
measured now: the two costs a draft tree is chosen by (`--tree auto` at the first start,
engine/tree_autotune.py) and the bench prints (`--verify-curve`, `--calibrate-tree`).

Both run on an idle engine: the verify pass uses one request of its own (aborted after),
drafting times the heads directly (for modules over the context, a step's real drafting
call on slot 0 of their cache, reset after).
"""

from __future__ import annotations

import itertools
import statistics
import time
from typing import Any

import torch

from ..config import SamplingParams

# `engine` below is an LLMEngine, not imported: llm_engine imports this module

WARM_RUNS = 3  # untimed runs first: they warm caches and the allocator
_ids = itertools.count()


def sync(device: torch.device) -> None:
    """Wait for the device, so that a clock read after it counts the queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def verify_times(engine: Any, filler: list[int], context: int, ks: list[int],
                 runs: int) -> list[dict]:
    """Median (and min) ms of one forward + the logits of every row over k new tokens at
    `context` committed tokens (filler repeated), for each k; ratio_to_k1 against ks[0]."""
    from ..spec.tree import DraftTree
    from .scheduler import ScheduledSeq

    need = context + max(ks) + 1
    if need > engine.kv.slot_len:
        raise ValueError(f"context {context} + k {max(ks)} exceeds the cache "
                         f"({engine.kv.slot_len} tokens): raise --max-model-len")
    cyc = itertools.cycle(filler)
    prompt = [next(cyc) for _ in range(context)]
    rid = f"step-costs-{next(_ids)}"
    engine.add_request(rid, prompt, SamplingParams(max_tokens=2, temperature=0.0, speculate=False,
                                                   ignore_eos=True))
    seq = engine._seqs[rid]
    while seq.num_cached < context:
        engine.step()
    rows = []
    try:
        with torch.inference_mode():
            for k in ks:
                tree = DraftTree([seq.token_ids[-1]] + prompt[:k - 1], list(range(-1, k - 1)))
                ids, meta, logit_rows = engine._prepare([ScheduledSeq(seq, tree.tokens, tree, True)])
                times = []
                for i in range(runs + WARM_RUNS):
                    sync(engine.device)
                    t0 = time.perf_counter()
                    hidden, _ = engine._forward(ids, meta)
                    engine.model.compute_logits(hidden[logit_rows])
                    sync(engine.device)
                    if i >= WARM_RUNS:
                        times.append(time.perf_counter() - t0)
                rows.append({"k": k, "ms": 1000 * statistics.median(times),
                             "ms_min": 1000 * min(times)})
    finally:
        engine.abort_request(rid)
    for r in rows:
        r["ratio_to_k1"] = r["ms"] / rows[0]["ms"]
    return rows


def draft_times(engine: Any, depths: int, context: int, runs: int, first: int = 1,
                token: int = 5) -> dict[int, float]:
    """Fastest ms of the heads' drafting for one sequence at depth first..depths (sequential
    heads run once per depth; modules over the context also write a step's entries)."""
    heads = engine.heads
    if heads is None:
        raise ValueError("no draft heads to time")
    H = engine.model_config.hidden_size
    hidden = torch.randn(1, H, device=engine.device, dtype=engine.dtype)
    if engine.module_ctx is not None:
        from ..spec.mtp_context import draft_timer

        draft = draft_timer(heads, engine.model, engine.module_ctx, context)
    else:
        def draft(depth: int) -> None:
            heads.candidates(hidden, engine.model, [token], depth, positions=[1])
    out: dict[int, float] = {}
    try:
        with torch.inference_mode():
            for depth in range(first, depths + 1):
                times = []
                for i in range(runs + WARM_RUNS):
                    sync(engine.device)
                    t0 = time.perf_counter()
                    draft(depth)
                    sync(engine.device)
                    if i >= WARM_RUNS:
                        times.append(time.perf_counter() - t0)
                out[depth] = 1000 * min(times)
    finally:
        if engine.module_ctx is not None:
            engine.module_ctx.reset(0)
    return out
