"""The --calibrate-tree section: pick the draft tree for these heads on this hardware.

Expected tokens per step come from the heads' held-out rank accuracies (heads.json, written
by train-heads); the cost of a step is the measured verify time of that many tokens
(verify_curve) plus the measured drafting time at the tree's depth; the candidates and
their ranking are spec/tree_choice.py's pure functions. `calibrate_tree` measures and prints.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import TYPE_CHECKING

import torch

from ...spec.tree_choice import rank_trees, tree_candidates
from .runs import sync
from .tables import format_table
from .verify_curve import verify_curve

if TYPE_CHECKING:
    from ...engine.llm_engine import LLMEngine


def _heads_meta(engine: LLMEngine) -> dict:
    from ...spec.heads_io import shipped_heads

    path = engine.config.spec.heads_path or str(shipped_heads(engine.model_config.fingerprint()))
    meta_path = os.path.join(path, "heads.json")
    if engine.heads is None or not os.path.isfile(meta_path):
        raise ValueError("--calibrate-tree needs heads in the project's format (--heads DIR "
                         "with heads.json)")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    rank_acc = meta.get("training", {}).get("heldout", {}).get("rank_acc")
    if not rank_acc:
        raise ValueError(f"{meta_path}: no training.heldout.rank_acc (train-heads writes it)")
    topk = getattr(engine.heads, "topk", None)
    return {"path": path, "rank_acc": [r[:topk] for r in rank_acc] if topk else rank_acc,
            "chain_only": meta.get("head_type") == "sequential"}


def calibrate_tree(engine: LLMEngine, args: argparse.Namespace, filler: list[int]) -> dict:
    """Measure the verify cost of every tree size and the heads' drafting cost here, then
    rank trees by expected speedup over plain decoding (heads' held-out accuracies)."""
    hm = _heads_meta(engine)
    cands = tree_candidates(hm["rank_acc"], chain_only=hm["chain_only"])
    sizes = sorted({1} | {1 + len(c) for c in cands.values()})
    curve = verify_curve(engine, filler, args.verify_context, sizes, args.verify_runs)
    verify_ms = {r["k"]: r["ms"] for r in curve}
    H = engine.model_config.hidden_size
    hidden = torch.randn(1, H, device=engine.device, dtype=engine.dtype)
    if engine.module_ctx is not None:  # modules over the context: a step's real drafting call
        from ...spec.mtp_context import draft_timer

        draft = draft_timer(engine.heads, engine.model, engine.module_ctx, args.verify_context)
    else:
        def draft(depth: int) -> None:
            engine.heads.candidates(hidden, engine.model, [filler[0]], depth, positions=[1])
    draft_ms: dict[int, float] = {}  # per depth: the heads draft only as deep as the tree
    with torch.inference_mode():
        for depth in range(1, len(hm["rank_acc"]) + 1):
            times = []
            for i in range(args.verify_runs + 3):
                sync(engine.device)
                t0 = time.perf_counter()
                draft(depth)
                sync(engine.device)
                if i >= 3:
                    times.append(time.perf_counter() - t0)
            draft_ms[depth] = 1000 * statistics.median(times)
    if engine.module_ctx is not None:
        engine.module_ctx.reset(0)
    rows = rank_trees(cands, hm["rank_acc"], verify_ms, draft_ms)
    best = rows[0]
    print(format_table(["tree", "nodes", "tokens_per_step", "step_ms", "speedup_vs_plain"],
                       [[r[c] for c in ("tree", "nodes", "tokens_per_step", "step_ms",
                                        "speedup_vs_plain")] for r in rows[:12]],
                       f"\ntree calibration for {hm['path']}: plain step {verify_ms[1]:.1f} ms, "
                       f"drafting {', '.join(f'{v:.1f}' for v in draft_ms.values())} ms at "
                       f"depth 1..{len(draft_ms)} (heads' held-out accuracies; top 12)"))
    print(f"best: {best['tree']} ({best['nodes']} nodes, expected {best['speedup_vs_plain']}x)")
    if args.tree_out:
        with open(args.tree_out, "w", encoding="utf-8") as f:
            json.dump(best["choices"], f)
            f.write("\n")
        print(f"wrote {args.tree_out} (serve with --tree {args.tree_out})")
    return {"heads": hm["path"], "draft_ms": draft_ms, "verify_ms": verify_ms, "rows": rows,
            "best": best["tree"]}
