"""The timed engine loop every section measures with: a batch of requests run to completion
on an idle engine, timed as a whole and split at the end of prefill (`run_engine_batch`),
plus the throughput row that sums such runs.

The baseline and the comparison time through here, and the verify curve through
engine/step_costs.py, whose device `sync` this module shares: their numbers mean the same
thing.
"""

from __future__ import annotations

import itertools
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ...config import SamplingParams
from ...engine.outputs import SpecStats
from ...engine.step_costs import sync

if TYPE_CHECKING:
    from ...engine.llm_engine import LLMEngine
    from ...engine.scheduler import Sequence

_request_ids = itertools.count()


def next_request_id() -> str:
    """A request id unique in this process (the engine refuses duplicates)."""
    return f"bench-{next(_request_ids)}"


def start_decoding(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams
                   ) -> list[Sequence]:
    """Submit the prompts and step until each has emitted its first token (prefill done):
    the engine's next steps decode. Returns their sequences."""
    rids = [next_request_id() for _ in prompts]
    for rid, p in zip(rids, prompts):
        engine.add_request(rid, p, params)
    seqs = [engine._seqs[r] for r in rids]
    while any(s.num_emitted < 1 for s in seqs):
        engine.step()
    return seqs


def batches(items: list, size: int) -> list[list]:
    """Consecutive groups of exactly `size`, cycling from the start to fill the last one."""
    n = max(1, -(-len(items) // size))
    cyc = itertools.cycle(items)
    return [[next(cyc) for _ in range(size)] for _ in range(n)]


@dataclass(slots=True)
class BatchRun:
    tokens: int  # output tokens, all sequences
    seconds: float  # add_request .. last token, prefill included
    steps: int
    prefill_seconds: float  # until every sequence has its first token
    decode_steps: int  # steps after that
    decode_tokens: int
    outputs: list[list[int]] = field(default_factory=list)
    spec: list[SpecStats] = field(default_factory=list)

    @property
    def decode_seconds(self) -> float:
        return self.seconds - self.prefill_seconds


def run_engine_batch(engine: LLMEngine, prompt_ids: list[list[int]],
                     params: list[SamplingParams]) -> BatchRun:
    """Run requests to completion on an idle engine, timing prefill and decode phases."""
    if engine.has_unfinished():
        raise RuntimeError("the benchmark needs an idle engine")
    rids = [next_request_id() for _ in prompt_ids]
    toks: dict[str, list[int]] = {r: [] for r in rids}
    spec: dict[str, SpecStats] = {}
    steps, t_first, steps_first, tok_first = 0, None, 0, 0
    t0 = time.perf_counter()
    for rid, ids, p in zip(rids, prompt_ids, params):
        engine.add_request(rid, ids, p)
    while engine.has_unfinished():
        outs = engine.step()
        sync(engine.device)
        steps += 1
        for o in outs:
            if o.error:
                raise RuntimeError(f"request failed: {o.error}")
            toks[o.request_id].extend(o.new_token_ids)
            if o.finished:
                spec[o.request_id] = o.spec
        if t_first is None and all(toks[r] for r in rids):
            t_first, steps_first = time.perf_counter(), steps
            tok_first = sum(len(t) for t in toks.values())
    end = time.perf_counter()
    total = sum(len(t) for t in toks.values())
    return BatchRun(total, end - t0, steps, (t_first or end) - t0, steps - steps_first,
                    total - tok_first, [toks[r] for r in rids], [spec[r] for r in rids])


def throughput_row(runs: list[BatchRun]) -> dict:
    """Tokens/s over the runs (prefill included), ms per decode step, decode-only tokens/s."""
    tokens = sum(r.tokens for r in runs)
    seconds = sum(r.seconds for r in runs)
    dsteps = sum(r.decode_steps for r in runs)
    dsec = sum(r.decode_seconds for r in runs)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "prefill_s_mean": sum(r.prefill_seconds for r in runs) / len(runs),
            "decode_steps": dsteps,
            "ms_per_step": 1000 * dsec / dsteps if dsteps else None,
            "decode_tokens_per_s": sum(r.decode_tokens for r in runs) / dsec if dsec else None}


def print_progress(row: dict) -> None:
    print(f"  {row['impl']:>12} batch {row['batch']:>3}: {row['tokens_per_s']:.1f} tok/s",
          file=sys.stderr, flush=True)
