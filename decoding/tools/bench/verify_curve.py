"""The --verify-curve section: the time of one forward (and the logits of every row) over
k new tokens at a fixed context. A speculative step drafting k - 1 tokens pays this; tree
calibration ranks trees with it.
"""

from __future__ import annotations

import itertools
import statistics
import time
from typing import TYPE_CHECKING

import torch

from ...config import SamplingParams
from .runs import next_request_id, sync

if TYPE_CHECKING:
    from ...engine.llm_engine import LLMEngine


def verify_curve(engine: LLMEngine, filler: list[int], context: int, ks: list[int],
                 runs: int) -> list[dict]:
    """Median time of one forward (+ logits of every row) over k new tokens at `context`."""
    from ...engine.scheduler import ScheduledSeq
    from ...spec.tree import DraftTree

    need = context + max(ks) + 1
    if need > engine.kv.slot_len:
        raise ValueError(f"--verify-context {context} + k {max(ks)} exceeds the cache "
                         f"({engine.kv.slot_len} tokens): raise --max-model-len")
    cyc = itertools.cycle(filler)
    prompt = [next(cyc) for _ in range(context)]
    rid = next_request_id()
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
                for i in range(runs + 3):
                    sync(engine.device)
                    t0 = time.perf_counter()
                    hidden = engine.compiled and engine.compiled(ids, meta, engine.kv)
                    if hidden is None:  # eager, or rows above the compiled buckets
                        hidden = engine.model(ids, meta, engine.kv)
                    elif isinstance(hidden, tuple):  # (hidden, pre_last) for Meta-style heads
                        hidden = hidden[0]
                    engine.model.compute_logits(hidden[logit_rows])
                    sync(engine.device)
                    if i >= 3:  # the first runs warm caches and allocator
                        times.append(time.perf_counter() - t0)
                rows.append({"k": k, "ms": 1000 * statistics.median(times),
                             "ms_min": 1000 * min(times)})
    finally:
        engine.abort_request(rid)
    for r in rows:
        r["ratio_to_k1"] = r["ms"] / rows[0]["ms"]
    return rows
