"""Sampled generation with `torch.multinomial` (the draw before session 20) against
`sample()`'s inverse CDF, in ONE process, alternating: tok/s of T = 0.7 generation (with
prefill, fixed length) at batch 1 and 16 on the same prompts and seed.

    flock /tmp/mtpserve-cpu.lock .venv/bin/python benchmarks/sampling_ab.py [--rounds 3]
        [--tokens 64] [--compile off]
"""

from __future__ import annotations

import argparse
import time

import torch
from mtpserve.decoding.config import EngineConfig, SamplingParams, SpecConfig
from mtpserve.decoding.engine import commit
from mtpserve.decoding.engine.llm_engine import LLMEngine
from mtpserve.decoding.spec import acceptance
from mtpserve.decoding.tools.bench.prompts import encode_prompts, load_prompts


def multinomial(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.multinomial(probs, 1, generator=generator)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--compile", default="off", choices=("off", "on", "auto"))
    args = ap.parse_args()
    eng = LLMEngine.from_config(EngineConfig(max_num_seqs=16, max_model_len=1024,
                                             compile=args.compile, spec=SpecConfig(mode="off")))
    _, raw = load_prompts(None, 16)
    prompts = encode_prompts(eng.tokenizer, raw)
    params = SamplingParams(max_tokens=args.tokens, temperature=0.7, seed=1, ignore_eos=True)
    draws = {"multinomial": multinomial, "inverse-cdf": commit.sample}
    res: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):
        for name, fn in draws.items():
            commit.sample = acceptance.sample = fn  # every sampled path's draw
            for b in (1, 16):
                t0 = time.perf_counter()
                outs = eng.generate(prompts[:b], params)
                toks = sum(len(o["token_ids"]) for o in outs)
                res.setdefault((name, b), []).append(toks / (time.perf_counter() - t0))
    commit.sample = acceptance.sample = draws["inverse-cdf"]
    print(f"T = 0.7, {args.tokens} tokens with prefill, compile {args.compile}, "
          f"{args.rounds} alternating rounds\n")
    print("| draw | batch 1 tok/s per round | batch 16 tok/s per round |")
    print("|---|---|---|")
    for name in draws:
        cells = [", ".join(f"{x:.1f}" for x in res[(name, b)]) for b in (1, 16)]
        print(f"| {name} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
