"""A burst of prompts arriving while sequences decode: how long each step (= each running
stream's next token) takes until the burst is prefilled, and when the burst's last prompt
gets its first token, for per-step prefill budgets while decoding (the scheduler's
`prefill_while_decoding`; "all" = the whole max_tokens_per_step). Plain decoding, default
weights.

    python benchmarks/burst.py [--decoding 8] [--burst 16] [--budgets all,512,256]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from mtpserve.decoding.tools.bench.prompts import encode_prompts, load_prompts
from mtpserve.decoding.config import EngineConfig, SamplingParams
from mtpserve.decoding.engine.llm_engine import LLMEngine


def run_burst(eng: LLMEngine, decoding: list[list[int]], burst: list[list[int]], tag: str
              ) -> dict:
    for i, p in enumerate(decoding):
        eng.add_request(f"{tag}-d{i}", p, SamplingParams(max_tokens=1000, temperature=0.0,
                                                          ignore_eos=True))
    for _ in range(6):  # prefill them and decode a little
        eng.step()
    for i, p in enumerate(burst):
        eng.add_request(f"{tag}-b{i}", p, SamplingParams(max_tokens=4, temperature=0.0,
                                                          ignore_eos=True))
    t0, steps, first = time.perf_counter(), [], set()
    while len(first) < len(burst):
        t = time.perf_counter()
        for out in eng.step():
            if "-b" in out.request_id and out.new_token_ids:
                first.add(out.request_id)
        steps.append(time.perf_counter() - t)
    ttft_last = time.perf_counter() - t0
    for rid in list(eng._seqs):
        eng.abort_request(rid)
    return {"steps": len(steps), "max_ms": 1000 * max(steps),
            "median_ms": 1000 * statistics.median(steps), "ttft_last_s": ttft_last}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--decoding", type=int, default=8, help="sequences decoding meanwhile")
    ap.add_argument("--burst", type=int, default=16, help="prompts arriving at once")
    ap.add_argument("--budgets", default="all,512,256")
    ap.add_argument("--repeats", type=int, default=2, help="alternating rounds")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = dataclasses.replace(EngineConfig(), max_num_seqs=args.decoding + args.burst)
    cfg.spec.mode = "off"
    eng = LLMEngine.from_config(cfg)
    _, prompts = load_prompts(None, args.decoding + args.burst)
    ids = encode_prompts(eng.tokenizer, prompts)
    decoding, burst = ids[:args.decoding], ids[args.decoding:]
    budgets = [b.strip() for b in args.budgets.split(",")]
    rows: dict[str, list[dict]] = {b: [] for b in budgets}
    for r in range(args.repeats):
        for b in budgets:
            eng.scheduler.prefill_while_decoding = None if b == "all" else int(b)
            rows[b].append(run_burst(eng, decoding, burst, f"r{r}-{b}"))
    print(f"{args.decoding} sequences decoding, {args.burst} prompts arrive at once "
          f"({sum(map(len, burst))} tokens); medians over {args.repeats} rounds")
    print(f"{'prefill while decoding':>22s} {'steps':>6s} {'max step ms':>12s} "
          f"{'median step ms':>15s} {'last first token s':>19s}")
    for b in budgets:
        med = lambda k: statistics.median(x[k] for x in rows[b])  # noqa: E731
        print(f"{b:>22s} {med('steps'):6.0f} {med('max_ms'):12.1f} {med('median_ms'):15.1f} "
              f"{med('ttft_last_s'):19.2f}")


if __name__ == "__main__":
    main()
