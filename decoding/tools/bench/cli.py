"""`mtpserve bench`'s flags and its entry point `run_bench`: parse and check the flags, load
the prompts, build the engine (or take an injected one), run the sections asked for and
write the JSON. The sections themselves live in their own modules (see bench/__init__.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from typing import TYPE_CHECKING

import torch

from .compare import COMPARE_SETTINGS, compare_spec, compare_tables
from .llama_cpp import lookup_section, lookup_table
from .memory import peak_rss_mb
from .plain import section_plain
from .profiling import profile_step
from .prompts import encode_prompts, load_prompts
from .tables import format_table
from .tree_calibration import calibrate_tree
from .verify_curve import verify_curve

if TYPE_CHECKING:
    from ...engine.llm_engine import LLMEngine


def add_bench_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("benchmark")
    g.add_argument("--prompts", default=None, metavar="PATH",
                   help="JSONL with `messages` or `prompt` per line (default: HumanEval)")
    g.add_argument("--num-prompts", type=int, default=16,
                   help="use the first N prompts (a fixed subset; default 16)")
    g.add_argument("--max-tokens", type=int, default=128, help="output tokens per prompt (128)")
    g.add_argument("--batch-sizes", default="1,4,16",
                   help="comma list; batch 1 is always measured (plain section)")
    g.add_argument("--warmup", type=int, default=1,
                   help="warm-up batches (16 tokens) before each measurement (1)")
    g.add_argument("--eos", action="store_true",
                   help="stop at EOS (default: fixed output lengths, ignore_eos)")
    g.add_argument("--out", default="results.json", help="JSON results file ('' to skip)")
    m = p.add_argument_group("sections (default: --plain only)")
    m.add_argument("--plain", action="store_true", help="plain decoding vs transformers")
    m.add_argument("--verify-curve", action="store_true", help="forward cost over k new tokens")
    m.add_argument("--compare", action="store_true", help="speculation off vs on")
    m.add_argument("--profile", action="store_true", help="torch.profiler table of one step")
    m.add_argument("--calibrate-tree", action="store_true",
                   help="pick the draft tree for these heads on this hardware: expected tokens "
                        "per step (held-out rank accuracies in heads.json) over the measured "
                        "cost of verifying that many tokens plus drafting")
    o = p.add_argument_group("section options")
    o.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline")
    o.add_argument("--llama-bench", default=None, metavar="PATH",
                   help="llama.cpp's llama-bench binary: time its plain decode on the same GGUF "
                        "file in this run (scripts/install_llama_cpp.sh builds one)")
    o.add_argument("--llama-rounds", type=int, default=1, metavar="N",
                   help="with --llama-bench: time our batch-1 decode and llama-bench N times, "
                        "alternating, and report each round's ratio and the median (for "
                        "machines whose speed drifts between minutes)")
    o.add_argument("--llama-lookup", default=None, metavar="PATH",
                   help="llama.cpp's llama-lookup binary: its own n-gram (prompt lookup) "
                        "speculation on these prompts, with and without drafts, in this run "
                        "(with --compare: against ours at greedy batch 1)")
    o.add_argument("--llama-lookup-draft", type=int, default=16, metavar="N",
                   help="llama-lookup's --draft (--spec-draft-n-max in newer builds): tokens "
                        "drafted per step (16)")
    o.add_argument("--transformers-batch-sizes", default=None,
                   help="batch sizes for transformers (default: same as --batch-sizes)")
    o.add_argument("--transformers-gguf", default="dense", choices=["dense", "packed"],
                   help="transformers >= 5 can keep GGUF weights packed (its own quantized "
                        "kernels); dense dequantizes them into --dtype like this engine does")
    o.add_argument("--bandwidth-gb", type=float, default=1.0,
                   help="tensor size for the memory-bandwidth measurement (0: skip)")
    o.add_argument("--verify-context", type=int, default=300, help="context for --verify-curve")
    o.add_argument("--verify-ks", default="1,2,4,8,16,32,64", help="k values for --verify-curve")
    o.add_argument("--verify-runs", type=int, default=30, help="timed runs per k (median)")
    o.add_argument("--compare-settings", default="greedy,typical,rejection",
                   help="subset of greedy,typical,rejection")
    o.add_argument("--compare-batch-sizes", default="1", help="batch sizes for --compare")
    o.add_argument("--profile-steps", type=int, default=1, help="decode steps in the profile")
    o.add_argument("--profile-rows", type=int, default=20, help="rows of the profile table")
    o.add_argument("--tree-out", default=None, metavar="PATH",
                   help="--calibrate-tree: write the chosen tree's choice list here (JSON)")


def parse_int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"expected a comma-separated list of integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"expected positive integers, got {text!r}")
    return values


def _build_engine(args: argparse.Namespace) -> LLMEngine:
    from ...engine.llm_engine import LLMEngine
    from ..engine_args import engine_config_from_args

    cfg = engine_config_from_args(args)
    need = max(parse_int_list(args.batch_sizes) + parse_int_list(args.compare_batch_sizes))
    if cfg.max_num_seqs < need:  # a batch of B must really run as B sequences together
        cfg = dataclasses.replace(cfg, max_num_seqs=need)
    return LLMEngine.from_config(cfg)


def _meta(engine: LLMEngine, args: argparse.Namespace, source: str,
          prompt_ids: list[list[int]]) -> dict:
    cfg = engine.config
    return {
        "model": engine.model_name, "device": str(engine.device),
        "dtype": str(engine.dtype).removeprefix("torch."),
        "weights": engine.weight_format,
        "unembed": getattr(engine.model, "unembed_format", "dense"),
        "speculate": cfg.spec.mode, "proposer": cfg.spec.proposer, "tree": cfg.spec.tree,
        # the tree drafted (what --tree auto chose on this machine, or the one named)
        "tree_choices": ([list(c) for c in engine.policy.choices] if engine.heads is not None
                         else None),
        "heads": engine.heads is not None, "max_num_seqs": cfg.max_num_seqs,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.platform(), "cpu": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else None,
        "prompts": source, "num_prompts": len(prompt_ids),
        "prompt_tokens_mean": sum(map(len, prompt_ids)) / len(prompt_ids),
        "max_tokens": args.max_tokens, "fixed_output_length": not args.eos,
        "warmup": args.warmup, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def run_bench(args: argparse.Namespace, engine: LLMEngine | None = None) -> int:
    """Entry point of `mtpserve bench`; `engine` may be injected (tests)."""
    try:
        batch_sizes = sorted(set([1] + parse_int_list(args.batch_sizes)))
        hf_sizes = (sorted(set(parse_int_list(args.transformers_batch_sizes)))
                    if args.transformers_batch_sizes else batch_sizes)
        ks = parse_int_list(args.verify_ks)
        cmp_sizes = parse_int_list(args.compare_batch_sizes)
        settings = [s.strip() for s in args.compare_settings.split(",") if s.strip()]
        bad = [s for s in settings if s not in COMPARE_SETTINGS]
        if bad:
            raise ValueError(f"unknown --compare-settings {bad}; choose from {list(COMPARE_SETTINGS)}")
        if args.llama_rounds < 1:
            raise ValueError(f"--llama-rounds must be at least 1, got {args.llama_rounds}")
        source, prompts = load_prompts(args.prompts, args.num_prompts)
        if engine is None:
            engine = _build_engine(args)
        prompt_ids = encode_prompts(engine.tokenizer, prompts)
    except (ValueError, OSError) as exc:  # bad flags, unreadable prompts, unloadable model
        print(f"error: {exc}", file=sys.stderr)
        return 2
    plain = args.plain or not (args.verify_curve or args.compare or args.profile
                               or args.calibrate_tree or args.llama_lookup)
    results: dict = {"meta": _meta(engine, args, source, prompt_ids)}
    if plain:
        results["plain"] = section_plain(engine, args, prompt_ids, batch_sizes, hf_sizes)
    if args.verify_curve:
        curve = verify_curve(engine, prompt_ids[0], args.verify_context, ks, args.verify_runs)
        results["verify_curve"] = {"context": args.verify_context, "runs": args.verify_runs,
                                   "rows": curve}
        print(format_table(["k", "ms", "ms_min", "ratio_to_k1"],
                           [[r["k"], r["ms"], r["ms_min"], r["ratio_to_k1"]] for r in curve],
                           f"\nverify curve: one forward over k new tokens at context "
                           f"{args.verify_context} (median of {args.verify_runs})"))
    if args.calibrate_tree:
        try:
            results["calibrate_tree"] = calibrate_tree(engine, args)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if args.compare:
        rows = compare_spec(engine, args, prompt_ids, settings, cmp_sizes)
        results["compare"] = rows
        print(compare_tables(rows))
        if results["meta"]["tree_choices"] is not None:
            print(f"draft tree (--tree {engine.config.spec.tree}): "
                  f"{results['meta']['tree_choices']}")
    if args.llama_lookup:
        results["llama_lookup"] = lookup_section(engine, args, prompt_ids,
                                                 results.get("compare"))
        print(lookup_table(results["llama_lookup"]))
    if args.profile:
        results["profile"] = {}
        modes = [False] + ([True] if engine.config.spec.mode != "off" else [])
        for spec in modes:
            label = "speculative" if spec else "plain"
            table, top = profile_step(engine, prompt_ids[0], spec, args.profile_steps,
                                      args.profile_rows)
            results["profile"][label] = top
            print(f"\nprofile: {args.profile_steps} {label} decode step(s), batch 1, "
                  f"top ops by self CPU time\n{table}")
    results["meta"]["peak_rss_mb_end"] = peak_rss_mb()
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
        print(f"\nwrote {args.out}")
    return 0
