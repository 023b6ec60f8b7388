"""The --compare section: speculation off vs on for the same prompts on ONE engine (the
per-request switch), on and off interleaved per prompt group so both see the same noise;
greedy, typical and rejection acceptance. Greedy runs also report where outputs differ
(`first_difference`, used by scripts/device_check.py and benchmarks/ too).
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from ...config import SamplingParams
from ...engine.outputs import SpecStats
from .runs import BatchRun, batches, run_engine_batch, throughput_row
from .tables import format_table

if TYPE_CHECKING:
    from ...engine.llm_engine import LLMEngine

COMPARE_SETTINGS = {  # name -> (temperature, acceptance rule)
    "greedy": (0.0, None),
    "typical": (0.7, "typical"),
    "rejection": (0.7, "rejection"),
}


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token (or the shorter length), None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def merge_spec_stats(stats: list[SpecStats]) -> SpecStats:
    """Sum per-request statistics: the pooled acceptance over all requests."""
    total = SpecStats(acceptance_rule=stats[0].acceptance_rule if stats else "none")
    for s in stats:
        total.num_steps += s.num_steps
        total.num_spec_steps += s.num_spec_steps
        total.num_draft_tokens += s.num_draft_tokens
        total.num_accepted_draft_tokens += s.num_accepted_draft_tokens
        for name in ("accepted_per_position", "drafted_per_position", "acceptance_histogram"):
            acc, add = getattr(total, name), getattr(s, name)
            acc.extend([0] * (len(add) - len(acc)))
            for i, v in enumerate(add):
                acc[i] += v
    return total


def compare_spec(engine: LLMEngine, args: argparse.Namespace, prompt_ids: list[list[int]],
                 settings: list[str], batch_sizes: list[int]) -> list[dict]:
    """Same prompts, on and off alternating first per group, so both see the same noise."""
    if engine.config.spec.mode == "off":
        raise ValueError("--compare needs speculation enabled (--speculate on|auto)")
    results = []
    for name in settings:
        temperature, rule = COMPARE_SETTINGS[name]
        for b in batch_sizes:
            groups = batches(list(range(len(prompt_ids))), b)

            def params(idx: list[int], on: bool, max_tokens: int = args.max_tokens):
                return [SamplingParams(max_tokens=max_tokens, temperature=temperature,
                                       acceptance=rule, seed=args.seed + i, speculate=on,
                                       ignore_eos=not args.eos) for i in idx]

            for _ in range(args.warmup):
                for on in (True, False):
                    run_engine_batch(engine, [prompt_ids[i] for i in groups[0]],
                                     params(groups[0], on, min(16, args.max_tokens)))
            runs: dict[bool, list[BatchRun]] = {True: [], False: []}
            for gi, idx in enumerate(groups):
                for on in ((True, False) if gi % 2 == 0 else (False, True)):
                    runs[on].append(run_engine_batch(engine, [prompt_ids[i] for i in idx],
                                                     params(idx, on)))
            results.append(_compare_row(name, b, runs[True], runs[False], greedy=temperature == 0))
            r = results[-1]
            print(f"  compare {name} batch {b}: speedup {r['speedup']:.2f}x", file=sys.stderr,
                  flush=True)
    return results


def _compare_row(name: str, batch: int, on: list[BatchRun], off: list[BatchRun],
                 greedy: bool) -> dict:
    t_on, t_off = throughput_row(on), throughput_row(off)
    stats = merge_spec_stats([s for r in on for s in r.spec])
    row = {"setting": name, "batch": batch,
           "on": t_on, "off": t_off, "speedup": t_on["tokens_per_s"] / t_off["tokens_per_s"],
           # per sequence: output tokens / steps that emitted for it (prefill end included)
           "tokens_per_step_on": t_on["tokens"] / sum(s.num_steps + 1 for r in on for s in r.spec),
           "spec": stats.to_dict()}
    if greedy:
        diffs = [first_difference(a, b) for r_on, r_off in zip(on, off)
                 for a, b in zip(r_on.outputs, r_off.outputs)]
        row["greedy_outputs_differ"] = sum(d is not None for d in diffs)
        row["greedy_first_difference"] = [d for d in diffs]
    return row


def compare_tables(rows: list[dict]) -> str:
    main = [[r["setting"], r["batch"], r["off"]["tokens_per_s"], r["on"]["tokens_per_s"],
             r["speedup"], r["spec"]["mean_acceptance_length"], r["tokens_per_step_on"],
             r["spec"]["draft_acceptance_rate"], r.get("greedy_outputs_differ")] for r in rows]
    text = [format_table(["setting", "batch", "off tok/s", "on tok/s", "speedup",
                          "accepted/step", "tokens/step", "draft acc", "greedy diffs"], main,
                         "\nspeculation off vs on (same prompts, interleaved)")]
    depth = max((len(r["spec"]["acceptance_rate_per_position"]) for r in rows), default=0)
    if depth:
        per_pos = [[r["setting"], r["batch"]] + [
            r["spec"]["acceptance_rate_per_position"][d]
            if d < len(r["spec"]["acceptance_rate_per_position"]) else None
            for d in range(depth)] for r in rows]
        text.append(format_table(["setting", "batch"] + [f"pos{d + 1}" for d in range(depth)],
                                 per_pos, "\nacceptance rate per draft position"))
    for r in rows:
        firsts = [(i, d) for i, d in enumerate(r.get("greedy_first_difference", [])) if d is not None]
        if firsts:
            text.append(f"greedy batch {r['batch']}: outputs differ for {len(firsts)} prompt(s); "
                        "first differing position (prompt, token): "
                        + ", ".join(f"({i}, {d})" for i, d in firsts[:10]))
    return "\n".join(text)
