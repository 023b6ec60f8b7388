"""Eager vs compiled trunk (--compile on): decode ms/step and tok/s at batch 1 and batch N,
the verify curve (one forward + logits over k rows), the first compile's time and the
graphs compiled while serving (must be 0). Plain decoding, default weights (int4 for the
embedded model on CPU); both engines in one process, interleaved, min over repeats (the
box is shared and noisy).

    python benchmarks/compiled_step.py [--mode default]
        [--tokens 32] [--batch 16] [--repeats 3] [--ks 1,2,4,8,16] [--context 128]
"""

from __future__ import annotations

import argparse
import time

import torch

from mtpserve.decoding.config import EngineConfig, SamplingParams, SpecConfig
from mtpserve.decoding.engine.llm_engine import LLMEngine
from mtpserve.decoding.tools.bench.prompts import encode_prompts, load_prompts
from mtpserve.decoding.tools.bench.runs import start_decoding
from mtpserve.decoding.tools.bench.verify_curve import verify_curve


def decode_ms_per_step(eng: LLMEngine, prompts: list[list[int]], tokens: int) -> float:
    """Prefill every prompt, then time the decode-only steps: ms per step."""
    start_decoding(eng, prompts, SamplingParams(max_tokens=tokens + 1, temperature=0.0,
                                                ignore_eos=True, speculate=False))
    steps, t0 = 0, time.perf_counter()
    while eng.has_unfinished():
        eng.step()
        steps += 1
    return 1000 * (time.perf_counter() - t0) / max(steps, 1)


def greedy_tokens(eng: LLMEngine, prompt: list[int], n: int) -> list[int]:
    out = eng.generate([prompt], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True,
                                                speculate=False))
    return out[0]["token_ids"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", default="default",
                    choices=["default", "max-autotune-no-cudagraphs"])
    ap.add_argument("--tokens", type=int, default=32, help="decode steps per measurement")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ks", default="1,2,4,8,16")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--runs", type=int, default=10, help="forwards per verify-curve point")
    args = ap.parse_args()
    ks = [int(x) for x in args.ks.split(",")]
    base = dict(spec=SpecConfig(mode="off"), max_num_seqs=max(args.batch, 1), max_model_len=512)

    eager = LLMEngine.from_config(EngineConfig(**base))
    t0 = time.perf_counter()
    comp = LLMEngine.from_config(EngineConfig(**base, compile="on",
                                              compile_mode=args.mode))
    ct = comp.compiled
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, weights "
          f"{comp.weight_format}, mode {args.mode}, batch-invariant {comp.model.batch_invariant}")
    print(f"engine start with compile: {time.perf_counter() - t0:.1f} s, of which warm-up "
          f"(compile) {ct.compile_seconds:.1f} s; {ct.compiles} graph(s)")

    _, raw = load_prompts(None, args.batch)
    prompts = encode_prompts(eager.tokenizer, raw)
    same = greedy_tokens(eager, prompts[0], 32) == greedy_tokens(comp, prompts[0], 32)
    compiles_after_warm_up = ct.compiles

    res: dict[str, dict[str, float]] = {"eager": {}, "compiled": {}}
    engines = {"eager": eager, "compiled": comp}
    for _ in range(args.repeats):  # interleaved, min over repeats
        for name, eng in engines.items():
            for label, ps in (("b1", prompts[:1]), (f"b{args.batch}", prompts[:args.batch])):
                ms = decode_ms_per_step(eng, ps, args.tokens)
                res[name][label] = min(res[name].get(label, float("inf")), ms)
    filler = [t for p in prompts for t in p]
    for name, eng in engines.items():
        for row in verify_curve(eng, filler, args.context, ks, args.runs):
            res[name][f"k{row['k']}"] = row["ms_min"]

    print(f"\ngreedy 32 tokens compiled == eager: {same}; graphs compiled while serving: "
          f"{ct.compiles - compiles_after_warm_up}")
    print("\n| measure (min over repeats) | eager | compiled | speedup |")
    print("|---|---|---|---|")
    for label, b in (("b1", 1), (f"b{args.batch}", args.batch)):
        e, c = res["eager"][label], res["compiled"][label]
        note = "" if ct.eager_from is None or b < ct.eager_from else " (eager in both)"
        print(f"| decode batch {b}: ms/step{note} | {e:.1f} | {c:.1f} | {e / c:.2f}x |")
        print(f"| decode batch {b}: tok/s | {1000 * b / e:.1f} | {1000 * b / c:.1f} | |")
    for k in ks:
        e, c = res["eager"][f"k{k}"], res["compiled"][f"k{k}"]
        note = "" if ct.eager_from is None or k < ct.eager_from else " (eager in both)"
        print(f"| verify k={k} (ctx {args.context}): forward+logits ms{note} | {e:.1f} | {c:.1f} | "
              f"{e / c:.2f}x |")


if __name__ == "__main__":
    main()
