"""Offline subcommands (generate, bench, train-heads, inspect, build-kernels, export-model,
export-heads), registered into the `mtpserve` command line by server/cli.py.

The engine flags live in engine_args.py; this module re-exports add_engine_args and
engine_config_from_args because server/cli.py reads them from here (`serve` takes the same
flags). Together with engine_args.py and bench/cli.py, the only place in decoding/ that reads
flags or environment variables.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from ..config import SamplingParams
from .engine_args import add_engine_args, engine_config_from_args


# -- generate ---------------------------------------------------------------------------
def _run_generate(a: argparse.Namespace) -> int:
    from ..engine.llm_engine import LLMEngine

    engine = LLMEngine.from_config(engine_config_from_args(a))
    tok = engine.tokenizer
    prompts = [tok.encode_chat([{"role": "user", "content": p}]) if a.chat else tok.encode(p)
               for p in a.prompts]
    params = SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, seed=a.seed_request,
                            top_p=a.top_p, stop=tuple(a.stop or ()))
    t0 = time.perf_counter()
    results = engine.generate(prompts, params)
    wall = time.perf_counter() - t0
    for prompt, r in zip(a.prompts, results):
        spec = r["spec"]
        n = len(r["token_ids"])
        if a.json:
            print(json.dumps({
                "prompt": prompt, "text": r["text"], "token_ids": r["token_ids"],
                "finish_reason": r["finish_reason"], "steps": spec.num_steps,
                "tokens_per_s": n / r["seconds"] if r["seconds"] else None,
                "speculative_decoding": spec.to_dict(),
            }))
        else:
            print(r["text"])
            print(f"-- {n} tokens, {spec.num_steps} steps, "
                  f"{spec.mean_acceptance_length:.2f} tokens/step, "
                  f"{n / r['seconds']:.1f} tok/s, finish={r['finish_reason']}", file=sys.stderr)
    if not a.json:
        print(f"-- total {wall:.2f} s", file=sys.stderr)
    return 0


# -- inspect ----------------------------------------------------------------------------
def _run_inspect(a: argparse.Namespace) -> int:
    from ..model.checkpoint import load_checkpoint
    from ..spec.heads_io import load_heads

    ck = load_checkpoint(a.model)
    n_params = sum(t.numel() for t in ck.tensors.values())
    info = {"name": ck.name, "path": ck.path, "parameters": n_params,
            "fingerprint": ck.config.fingerprint(), "config": ck.config.to_dict(),
            "tokenizer": {"vocab_size": ck.tokenizer.vocab_size,
                          "bos": ck.tokenizer.bos_token_id,
                          "eos": list(ck.tokenizer.eos_token_ids)}}
    if a.heads:
        h = load_heads(a.heads, ck.config)
        info["heads"] = {"type": getattr(h, "kind", "medusa"), "num_heads": h.num_heads,
                         "num_layers": getattr(h, "num_layers", 1),
                         "default_tree": h.default_tree}
    print(json.dumps(info, indent=2, default=str))
    return 0


# -- build-kernels ----------------------------------------------------------------------
def _run_build_kernels(a: argparse.Namespace) -> int:
    from ..model.kernel_build import build_all, cpu_kernels, kernel_cache_dir

    sources = cpu_kernels("int4", "auto", "auto", "auto")  # every kernel a CPU engine loads
    if not sources:
        print("no C++ kernels for this architecture (x86-64 only): nothing to build")
        return 0
    print(f"building {len(sources)} C++ kernel(s) for this machine into {kernel_cache_dir()} "
          "(once; a first start would build them)", flush=True)
    t0 = time.perf_counter()
    results = build_all(sources)
    for name, error in results.items():
        print(f"  {name}: {'ready' if error is None else 'FAILED: ' + error}")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0 if all(error is None for error in results.values()) else 1


def _run_bench(a: argparse.Namespace) -> int:
    from .bench.cli import run_bench

    return run_bench(a)


def _run_train_heads(a: argparse.Namespace) -> int:
    from ..training.train_heads import run_train_heads

    return run_train_heads(a)


def register_offline_commands(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="offline generation for prompts given on the command line")
    g.add_argument("prompts", nargs="+", help="prompt texts")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed-request", type=int, default=None, help="sampling seed")
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--chat", action="store_true", help="wrap each prompt as a chat user message")
    g.add_argument("--json", action="store_true", help="one JSON object per prompt")
    add_engine_args(g)
    g.set_defaults(func=_run_generate)

    b = sub.add_parser("bench", help="offline benchmark: tokens/s, ms/step, speculation on vs off, "
                                     "vs transformers; prints a table, writes JSON")
    from .bench.cli import add_bench_args

    add_bench_args(b)
    add_engine_args(b)
    b.set_defaults(func=_run_bench)

    t = sub.add_parser("train-heads", help="train Medusa draft heads by self-distillation")
    from ..training.train_config import add_train_args

    add_train_args(t)
    t.set_defaults(func=_run_train_heads)

    i = sub.add_parser("inspect", help="print a checkpoint's config, tokenizer and heads")
    i.add_argument("--model", default=None, help="GGUF file or HF folder (default: embedded)")
    i.add_argument("--heads", default=None, help="heads folder to check against the model")
    i.set_defaults(func=_run_inspect)

    k = sub.add_parser("build-kernels", help="build our C++ kernels for this machine now "
                                             "(else the first start does)")
    k.set_defaults(func=_run_build_kernels)

    # -- exports for other engines (decoding/tools/export.py): export-model, export-heads --------
    from .export import add_export_commands

    add_export_commands(sub)
