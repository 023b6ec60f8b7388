"""The cost of a step that admits a prompt while other sequences decode: attention in
groups (the prompt's chunk alone, the decodes together; the engine's way) vs one padded
batch (every decoding sequence's queries padded to the chunk's length). Plain decoding,
default weights; median milliseconds of the admitting step and of a decode-only step.

    python benchmarks/mixed_step.py [--decoding 15] [--arrivals 6] [--repeats 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from mtpserve.decoding.engine import llm_engine as engine_mod
from mtpserve.decoding.engine import step_inputs
from mtpserve.decoding.tools.bench.prompts import encode_prompts, load_prompts
from mtpserve.decoding.config import EngineConfig, SamplingParams


def _one_group(batch: list) -> list[list[int]]:
    return [list(range(len(batch)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--decoding", type=int, default=15, help="sequences decoding meanwhile")
    ap.add_argument("--arrivals", type=int, default=6, help="prompts admitted, one per step")
    ap.add_argument("--repeats", type=int, default=2, help="alternating rounds per layout")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = dataclasses.replace(EngineConfig(), max_num_seqs=args.decoding + 1)
    cfg.spec.mode = "off"
    eng = engine_mod.LLMEngine.from_config(cfg)
    _, prompts = load_prompts(None, args.decoding + args.arrivals)
    ids = encode_prompts(eng.tokenizer, prompts)
    layouts = {"grouped": step_inputs.attention_groups, "one padded batch": _one_group}
    admit: dict[str, list[float]] = {k: [] for k in layouts}
    plain: dict[str, list[float]] = {k: [] for k in layouts}
    try:
        for _ in range(args.repeats):
            for name, grouping in layouts.items():
                step_inputs.attention_groups = grouping
                for i in range(args.decoding):
                    eng.add_request(f"{name}-d{i}", ids[i], SamplingParams(
                        max_tokens=400, temperature=0.0, ignore_eos=True))
                for _ in range(8):  # prefill them, then a few decode steps
                    eng.step()
                for j in range(args.arrivals):
                    eng.add_request(f"{name}-a{j}", ids[args.decoding + j], SamplingParams(
                        max_tokens=1, temperature=0.0, ignore_eos=True))
                    t = time.perf_counter()
                    eng.step()
                    admit[name].append(time.perf_counter() - t)
                    t = time.perf_counter()
                    eng.step()
                    plain[name].append(time.perf_counter() - t)
                for rid in list(eng._seqs):
                    eng.abort_request(rid)
    finally:
        step_inputs.attention_groups = layouts["grouped"]
    lens = [len(ids[args.decoding + j]) for j in range(args.arrivals)]
    print(f"{args.decoding} sequences decoding; admitted prompts of {min(lens)}-{max(lens)} tokens")
    print(f"{'attention layout':18s} {'admitting step ms':>18s} {'decode-only step ms':>20s}")
    for name in layouts:
        print(f"{name:18s} {1000 * statistics.median(admit[name]):18.1f} "
              f"{1000 * statistics.median(plain[name]):20.1f}")


if __name__ == "__main__":
    main()
