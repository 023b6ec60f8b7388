"""Inductor's freezing for the quantized trunk, A/B in one process: the compiled trunk with
its weights frozen into the graph (forced; the default before session 21) against the
default (quantized weights stay graph inputs): each engine's start (run twice: the first
run fills inductor's cache for both) and the median ms per decode step at batch 1 and 16,
rounds alternating, greedy tokens compared.

    python benchmarks/freezing_ab.py [--rounds 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import mtpserve.decoding.model.compiled as C
from mtpserve.decoding.config import EngineConfig, SamplingParams, SpecConfig
from mtpserve.decoding.engine.llm_engine import LLMEngine

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--rounds", type=int, default=8)
args = ap.parse_args()
orig = C.inductor_options


def build(force_freeze: bool) -> tuple[LLMEngine, float]:
    # "dense" makes inductor_options freeze the graph whatever the weights
    frozen = lambda m, d="cpu", w="dense": orig(m, d, "dense")
    C.inductor_options = frozen if force_freeze else orig
    t0 = time.perf_counter()
    eng = LLMEngine.from_config(EngineConfig(spec=SpecConfig(mode="off"), compile="on",
                                             max_num_seqs=16))
    return eng, time.perf_counter() - t0


a, ta = build(True)
b, tb = build(False)
print(f"engine start (caches warm): frozen {ta:.1f} s, not frozen {tb:.1f} s")
tok = a.tokenizer
one = [tok.encode("Write a short story about a robot learning to paint.")]
many = [tok.encode(f"Explain topic number {i} of computer science in detail.") for i in range(16)]
p = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True, speculate=False)
for name, prompts in (("batch 1", one), ("batch 16", many)):
    res, outs = {"frozen": [], "not frozen": []}, {}
    for r in range(args.rounds):
        for k, eng in (("frozen", a), ("not frozen", b)):
            t0 = time.perf_counter()
            out = eng.generate(prompts, p)
            res[k].append((time.perf_counter() - t0) * 1000 / 128)
            outs[k] = [o["token_ids"] for o in out]
    m = {k: statistics.median(v) for k, v in res.items()}
    print(f"{name}: ms per step median frozen {m['frozen']:.2f}, not frozen {m['not frozen']:.2f} "
          f"(ratio {m['not frozen'] / m['frozen']:.3f}); same tokens {outs['frozen'] == outs['not frozen']}")
