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
from contextlib import nullcontext

import torch
from lockstep import print_ratio_table, run_lockstep

from mtpserve.decoding.config import EngineConfig, SamplingParams, SpecConfig
from mtpserve.decoding.engine.llm_engine import LLMEngine
from mtpserve.decoding.model import compiled
from mtpserve.decoding.spec import compiled_draft
from mtpserve.decoding.tools.bench.prompts import encode_prompts, load_prompts

ARMS = ("computed", "skipped")
HINTS = {"skipped": compiled.live_rows, "computed": lambda n, rows: nullcontext()}


def use_hint(arm: str) -> None:
    compiled.live_rows = compiled_draft.live_rows = HINTS[arm]


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
    ms, tokens = run_lockstep(engines, prompts, params, args.steps, before_step=use_hint)
    use_hint("skipped")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"speculation {'on' if args.spec else 'off'}, {len(ms[ARMS[0]])} steps each; "
          f"greedy tokens identical: {tokens['skipped'] == tokens['computed']}")
    print_ratio_table(ms, "arm")


if __name__ == "__main__":
    main()
