"""The compiled step's host-side work, A/B in one process: engines that differ only in how
the compiled graph calls its kernels, stepped in lockstep (one decode step of each in turn,
the order rotating), so the noisy VMs here slow every variant alike; the table gives each
variant's median ms per step and the median (and quartiles) of its per-step ratio to the
first variant, and checks that every variant emits the same greedy tokens.

Variants, each adding to the one before (default: all):
  python-op    each layer's attention through mtpserve::cached_attention, the Python op;
               inductor's wrapper code (buffers, kernel calls) in Python; every call through
               dynamo's frame evaluation (the compiled step before session 19)
  cpp-op       mtpserve_rows::step_attention: a decode step's 30 calls run no Python
  cpp-wrapper  that wrapper generated as C++ (cpp_wrapper), compiled with the kernels in
               one -O3 unit
  cpp-wrapper-separate  the C++ wrapper compiled apart from the kernels, at -O1
               (cpp_wrapper_build_separate: a shorter first compile)
  direct       the warm graph's code called without dynamo's frame evaluation (today's
               engine: cpp-op + cpp-wrapper-separate + direct)

    python benchmarks/step_host_ab.py [--variants python-op,cpp-op,cpp-wrapper]
        [--batch 1] [--steps 400] [--spec]
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager
from collections.abc import Iterator

import torch
from lockstep import print_ratio_table, run_lockstep

from mtpserve.decoding.config import EngineConfig, SamplingParams, SpecConfig
from mtpserve.decoding.engine.llm_engine import LLMEngine
from mtpserve.decoding.model import compiled, step_attention
from mtpserve.decoding.tools.bench.prompts import encode_prompts, load_prompts

VARIANTS = ("python-op", "cpp-op", "cpp-wrapper", "cpp-wrapper-separate", "direct")


@contextmanager
def variant(name: str) -> Iterator[None]:
    """Patches in force while an engine is built (the graph is traced and compiled then)."""
    attention_op, options = step_attention.attention_op, compiled.inductor_options
    if name == "python-op":
        step_attention.attention_op = lambda row_kernel: torch.ops.mtpserve.cached_attention
    wrapper = {"cpp_wrapper": name.startswith("cpp-wrapper") or name == "direct",
               "cpp_wrapper_build_separate": name in ("cpp-wrapper-separate", "direct")}
    compiled.inductor_options = lambda *a, **k: {**options(*a, **k), **wrapper}
    try:
        yield
    finally:
        step_attention.attention_op, compiled.inductor_options = attention_op, options


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=400, help="timed steps per variant")
    ap.add_argument("--tokens", type=int, default=200, help="tokens per request (then restart)")
    ap.add_argument("--spec", action="store_true", help="speculation on (shipped heads)")
    args = ap.parse_args()
    names = args.variants.split(",")
    if unknown := set(names) - set(VARIANTS):
        raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")

    engines: dict[str, LLMEngine] = {}
    for name in names:
        t0 = time.perf_counter()
        with variant(name):
            engines[name] = LLMEngine.from_config(EngineConfig(
                compile="on", max_num_seqs=max(args.batch, 1), max_model_len=1024,
                spec=SpecConfig(mode="on" if args.spec else "off")))
        if name != "direct":  # through dynamo (the trunk's guards skipped, as before)
            engines[name].compiled._direct = None
            if (chain := getattr(engines[name].heads, "compiled_chain", None)) is not None:
                chain._direct.clear()
        print(f"{name}: engine ready in {time.perf_counter() - t0:.1f} s", flush=True)
    _, raw = load_prompts(None, args.batch)
    prompts = encode_prompts(engines[names[0]].tokenizer, raw)
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True,
                            speculate=args.spec)

    ms, tokens = run_lockstep(engines, prompts, params, args.steps)
    same = all(tokens[n] == tokens[names[0]] for n in names)
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"speculation {'on' if args.spec else 'off'}, {len(ms[names[0]])} steps each; "
          f"greedy tokens identical across variants: {same}")
    print_ratio_table(ms)


if __name__ == "__main__":
    main()
