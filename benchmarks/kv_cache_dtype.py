"""KV cache in fp32 vs fp16 (`--kv-cache-dtype`): decode ms/step at batch 1 and 16 and
greedy agreement, the two engines in one process, run alternately.

Why: attention reads every cached key and value of every sequence each step; at 16
sequences that traffic, not arithmetic, bounds the row kernel, and fp16 halves it (the
kernel widens fp16 to fp32 as it loads). Prints one table: median ms per decode step
(after every prompt's prefill) on HumanEval chat prompts, 128 greedy tokens each
(ignore_eos), the median over rounds with every round's figure (this VM's speed drifts
between minutes: compare within a round), and how many batch-16 outputs are identical
between the two caches.

    .venv/bin/python benchmarks/kv_cache_dtype.py [--rounds 2] [--compile auto]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

DTYPES = ("float32", "float16")


def decode_ms(engine, prompts: list[list[int]], tokens: int) -> tuple[float, dict[str, list[int]]]:
    """Median ms per decode step of `prompts` run together, and each one's tokens."""
    from mtpserve.decoding.config import SamplingParams

    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=tokens, temperature=0.0,
                                                      speculate=False, ignore_eos=True))
    outs: dict[str, list[int]] = {}
    times = []
    while engine.has_unfinished():
        prefilled = all(outs.get(f"r{i}") for i in range(len(prompts)))
        t0 = time.perf_counter()
        for o in engine.step():
            outs.setdefault(o.request_id, []).extend(o.new_token_ids)
        if prefilled:
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times), outs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--compile", default="auto", choices=["off", "on", "auto"])
    a = p.parse_args(argv)

    from mtpserve.decoding.config import EngineConfig
    from mtpserve.decoding.engine.llm_engine import LLMEngine
    from mtpserve.decoding.tools.bench.prompts import encode_prompts, load_prompts

    engines = {d: LLMEngine.from_config(EngineConfig(compile=a.compile, max_num_seqs=16,
                                                     kv_cache_dtype=d)) for d in DTYPES}
    _, rows = load_prompts(None, 16)
    prompts = encode_prompts(engines["float32"].tokenizer, rows)
    ms: dict[tuple[str, int], list[float]] = {}
    outs: dict[str, dict[str, list[int]]] = {}
    for _ in range(a.rounds):
        for d, engine in engines.items():
            for batch in (1, 16):
                t, got = decode_ms(engine, prompts[:batch], a.tokens)
                ms.setdefault((d, batch), []).append(t)
                if batch == 16:
                    outs[d] = got
    same = sum(outs["float32"][r] == outs["float16"][r] for r in outs["float32"])
    med = {k: statistics.median(v) for k, v in ms.items()}
    ref = engines["float32"]
    print(f"decode ms/step (median over {a.rounds} rounds; each round's), 16 HumanEval chat "
          f"prompts, {a.tokens} greedy tokens, weights {ref.weight_format}, compiled "
          f"{ref.compiled is not None}")
    print("| KV cache | batch 1 | batch 16 |")
    print("|---|---|---|")
    def cell(d: str, b: int) -> str:
        return f"{med[d, b]:.2f} ({', '.join(f'{x:.1f}' for x in ms[d, b])})"

    for d in DTYPES:
        print(f"| {d} | {cell(d, 1)} | {cell(d, 16)} |")

    def ratios(b: int) -> str:
        per = [x / y for x, y in zip(ms["float32", b], ms["float16", b])]
        return f"{statistics.median(per):.3f} ({', '.join(f'{r:.2f}' for r in per)})"

    print(f"| fp32 / fp16, per round | {ratios(1)} | {ratios(16)} |")
    print(f"batch-16 greedy outputs identical fp16 vs fp32 cache: {same}/{len(outs['float32'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
