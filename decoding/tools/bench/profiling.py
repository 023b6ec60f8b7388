"""The --profile section: a torch.profiler table of decode steps of one warmed-up request,
plain or speculative, to see where a step's time goes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...config import SamplingParams
from .runs import start_decoding, sync

if TYPE_CHECKING:
    from ...engine.llm_engine import LLMEngine


def profile_step(engine: LLMEngine, prompt: list[int], speculate: bool, steps: int, rows: int
                 ) -> tuple[str, list[dict]]:
    """Prefill and warm up one request, then profile `steps` decode steps."""
    from torch.profiler import ProfilerActivity, profile

    warm = 4
    seq, = start_decoding(engine, [prompt], SamplingParams(
        max_tokens=warm + steps + 8, temperature=0.0, speculate=speculate, ignore_eos=True))
    rid = seq.request_id
    for _ in range(warm):
        engine.step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.device.type == "cuda" else [])
    try:
        with profile(activities=acts) as prof:
            for _ in range(steps):
                engine.step()
            sync(engine.device)
    finally:
        engine.abort_request(rid)
    avg = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    top = [{"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1000,
            "cpu_total_ms": e.cpu_time_total / 1000} for e in avg[:rows]]
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows), top
