"""A compiled one-row step's padding row in the int4 kernel: computed (before session 26)
or skipped (`int4_vnni.live_rows`), A/B in one process.

A compiled graph runs a one-row step as two rows (model/compiled.py; the draft chain's graph
too). Two engines of the same settings are stepped in lockstep (one decode step of each in
turn, the order rotating), so the noisy VMs here slow both alike; the `computed` engine runs
with the hint turned off around its steps. Prints each arm's median ms per step, the median
(and quartiles) of the per-step ratio skipped / computed, and whether both emitted the same
greedy tokens.

    python benchmarks/padded_rows_ab.py [--batch 1] [--steps 400] [--spec]
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch

from mtpserve.decoding.config import EngineConfig, SamplingParams, SpecConfig
from mtpserve.decoding.engine.llm_engine import LLMEngine
from mtpserve.decoding.model import compiled
from mtpserve.decoding.spec import compiled_draft
from mtpserve.decoding.tools.bench.prompts import encode_prompts, load_prompts
from mtpserve.decoding.tools.bench.runs import start_decoding

ARMS = ("computed", "skipped")
HINTS = {"skipped": compiled.live_rows, "computed": lambda n, rows: nullcontext()}


def step(engine: LLMEngine, arm: str) -> float:
    compiled.live_rows = compiled_draft.live_rows = HINTS[arm]
    t0 = time.perf_counter()
    engine.step()
    return 1000 * (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=400, help="timed steps per arm")
    ap.add_argument("--tokens", type=int, default=200, help="tokens per request (then restart)")
    ap.add_argument("--spec", action="store_true", help="speculation on (shipped heads)")
    args = ap.parse_args()
    engines = {arm: LLMEngine.from_config(EngineConfig(
        compile="on", max_num_seqs=max(args.batch, 1), max_model_len=1024,
        spec=SpecConfig(mode="on" if args.spec else "off", tree="default")))
        for arm in ARMS}
    _, raw = load_prompts(None, args.batch)
    prompts = encode_prompts(engines[ARMS[0]].tokenizer, raw)
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True,
                            speculate=args.spec)
    ms: dict[str, list[float]] = {a: [] for a in ARMS}
    tokens: dict[str, list[list[int]]] = {a: [] for a in ARMS}
    seqs: dict[str, list] = {}
    rnd = 0
    while len(ms[ARMS[0]]) < args.steps:
        if not seqs or any(not e.has_unfinished() for e in engines.values()):
            for arm, e in engines.items():
                while e.has_unfinished():  # an arm a step behind finishes untimed
                    step(e, arm)
                if arm in seqs:
                    tokens[arm] += [list(s.output_ids) for s in seqs[arm]]
                seqs[arm] = start_decoding(e, prompts, params)
        for arm in (ARMS if rnd % 2 == 0 else ARMS[::-1]):
            ms[arm].append(step(engines[arm], arm))
        rnd += 1
    for arm, e in engines.items():
        while e.has_unfinished():
            step(e, arm)
        tokens[arm] += [list(s.output_ids) for s in seqs[arm]]
    compiled.live_rows = compiled_draft.live_rows = HINTS["skipped"]

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"speculation {'on' if args.spec else 'off'}, {len(ms[ARMS[0]])} steps each; "
          f"greedy tokens identical: {tokens['skipped'] == tokens['computed']}")
    print("\n| arm | median ms/step | ratio to computed (median of per-step pairs) | quartiles |")
    print("|---|---|---|---|")
    for arm in ARMS:
        r = sorted(a / b for a, b in zip(ms[arm], ms["computed"]))
        q1, q3 = r[len(r) // 4], r[3 * len(r) // 4]
        print(f"| {arm} | {statistics.median(ms[arm]):.2f} | {statistics.median(r):.3f} "
              f"| {q1:.3f}-{q3:.3f} |")


if __name__ == "__main__":
    main()
