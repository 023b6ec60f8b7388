"""The --calibrate-tree section: pick the draft tree for these heads on this hardware.

Expected tokens per step come from the heads' held-out rank accuracies (heads.json, written
by train-heads); the cost of a step is the measured verify time of that many tokens
plus the measured drafting time at the tree's depth (engine/step_costs.py); the candidates
and their ranking are spec/tree_choice.py's pure functions. The engine does the same at its
first start for `--tree auto` (engine/tree_autotune.py); this section prints it.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from ...engine.tree_autotune import heads_accuracies, measure_and_rank
from .tables import format_table

if TYPE_CHECKING:
    from ...engine.llm_engine import LLMEngine


def calibrate_tree(engine: LLMEngine, args: argparse.Namespace) -> dict:
    """Measure the verify cost of every tree size and the heads' drafting cost here, then
    rank trees by expected speedup over plain decoding (heads' held-out accuracies): what
    `--tree auto` does at the engine's first start (engine/tree_autotune.py), printed."""
    from ...spec.heads_io import shipped_heads

    path = engine.config.spec.heads_path or shipped_heads(engine.model_config.fingerprint())
    acc = (heads_accuracies(path, getattr(engine.heads, "topk", None))
           if engine.heads is not None else None)
    if acc is None:
        raise ValueError("--calibrate-tree needs heads in the project's format (--heads DIR "
                         "with heads.json and its training.heldout.rank_acc, as train-heads "
                         "writes)")
    got = measure_and_rank(engine, acc, args.verify_context, args.verify_runs)
    rows, verify_ms, draft_ms = got["rows"], got["verify_ms"], got["draft_ms"]
    best = rows[0]
    print(format_table(["tree", "nodes", "tokens_per_step", "step_ms", "speedup_vs_plain"],
                       [[r[c] for c in ("tree", "nodes", "tokens_per_step", "step_ms",
                                        "speedup_vs_plain")] for r in rows[:12]],
                       f"\ntree calibration for {acc['path']}: plain step {verify_ms[1]:.1f} ms, "
                       f"drafting {', '.join(f'{v:.1f}' for v in draft_ms.values())} ms at "
                       f"depth 1..{len(draft_ms)} (heads' held-out accuracies; top 12)"))
    print(f"best: {best['tree']} ({best['nodes']} nodes, expected {best['speedup_vs_plain']}x)")
    if args.tree_out:
        with open(args.tree_out, "w", encoding="utf-8") as f:
            json.dump(best["choices"], f)
            f.write("\n")
        print(f"wrote {args.tree_out} (serve with --tree {args.tree_out})")
    return {"heads": acc["path"], "draft_ms": draft_ms, "verify_ms": verify_ms, "rows": rows,
            "best": best["tree"]}
