"""Drafting cost per depth of a heads folder on the engine as served (default weights:
int4 on CPU, so sequential heads draft in int4; `--weights dense` for the fp32 path):
median milliseconds of one sequence's drafting call at depth 1..D (for modules that attend
over the context: writing 2 accepted rows' entries at context 300, then the chain, as a
decode step does; else one `candidates()` call).

    python benchmarks/draft_cost.py [--heads DIR] [--weights auto|dense] [--depth 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mtpserve.decoding.config import EngineConfig, SpecConfig
from mtpserve.decoding.engine.llm_engine import LLMEngine
from mtpserve.decoding.spec.mtp_context import draft_timer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", default=None, help="heads folder (default: the shipped ones)")
    ap.add_argument("--weights", default="auto")
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--runs", type=int, default=35)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    eng = LLMEngine.from_config(EngineConfig(weights=args.weights, spec=SpecConfig(
        mode="on", proposer="heads", heads_path=args.heads)))
    hidden = torch.randn(1, eng.model_config.hidden_size, device=eng.device, dtype=eng.dtype)
    if eng.module_ctx is not None:
        draft = draft_timer(eng.heads, eng.model, eng.module_ctx, 300)
        what = "drafting call (context 300, 2 new rows)"
    else:
        def draft(depth: int) -> None:
            eng.heads.candidates(hidden, eng.model, [5], depth, positions=[100])
        what = "candidates() call"
    print(f"{type(eng.heads).__name__}, trunk {eng.weight_format}: ms per {what}")
    with torch.inference_mode():
        for depth in range(1, args.depth + 1):
            times = []
            for i in range(args.runs + 5):
                t0 = time.perf_counter()
                draft(depth)
                if i >= 5:
                    times.append(time.perf_counter() - t0)
            print(f"depth {depth}: {1000 * statistics.median(times):.2f}", flush=True)


if __name__ == "__main__":
    main()
