"""The speculation tree chosen from held-out accuracies: the expected accepted drafts of a
tree under per-head rank accuracies, Medusa's greedy calibrated tree, and the default
preset written with the heads.

Why a module of its own: pure functions of the measured accuracies, used after every
training mode and by `mtpserve bench` (tools/bench.py) to rank trees.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..spec.tree import PRESETS


def expected_accepted(choices: list[tuple[int, ...]], rank_acc: list[list[float]]) -> float:
    """Expected drafted tokens accepted per step (bonus excluded), heads independent."""
    total = 0.0
    for path in choices:
        if len(path) > len(rank_acc) or any(r >= len(rank_acc[d]) for d, r in enumerate(path)):
            continue
        total += math.prod(rank_acc[d][r] for d, r in enumerate(path))
    return total


def calibrated_tree(rank_acc: list[list[float]], num_nodes: int, chain_only: bool = False
                    ) -> list[tuple[int, ...]]:
    """Medusa's greedy construction: add the node with the highest path probability.
    chain_only (sequential heads, which draft every depth after the top-1 token of the
    one before): only the top-1 node of a depth has children."""
    chosen: list[tuple[int, ...]] = []
    frontier = {(r,) for r in range(len(rank_acc[0]))}
    while frontier and len(chosen) < num_nodes:
        best = max(sorted(frontier), key=lambda p: expected_accepted([p], rank_acc))
        frontier.remove(best)
        chosen.append(best)
        if len(best) < len(rank_acc) and not (chain_only and best[-1] != 0):
            frontier |= {best + (r,) for r in range(len(rank_acc[len(best)]))}
    return sorted(chosen, key=lambda c: (len(c), c))


def on_chain(choices: list[tuple[int, ...]]) -> bool:
    """Every path branches off the top-1 chain (what sequential heads can fill)."""
    return all(all(r == 0 for r in c[:-1]) for c in choices)


def choose_tree(rank_acc: list[list[float]], out: Path, chain_only: bool = False,
                topk: int | None = None) -> tuple[str, dict]:
    """Expected accepted drafts per step of each preset under the measured held-out rank
    accuracies (heads taken as independent, as Medusa does; for sequential heads,
    `chain_only`, the accuracies are conditional on the earlier depths being right and
    only trees that branch off the top-1 chain count), and a calibrated 16-node choice
    list written to OUT/tree.json. The default tree is the preset with the highest
    expectation (fewer nodes on a tie); `--tree OUT/tree.json` selects the calibrated one.
    `topk`: the ranks the heads draft (deeper ranks are never filled)."""
    if topk is not None:
        rank_acc = [r[:topk] for r in rank_acc]
    presets = {n: ch for n, ch in PRESETS.items() if not chain_only or on_chain(ch)}
    scores = {name: round(expected_accepted(ch, rank_acc), 3) for name, ch in presets.items()}
    custom = calibrated_tree(rank_acc, 16, chain_only)
    (out / "tree.json").write_text(json.dumps([list(c) for c in custom]) + "\n")
    best = max(scores, key=lambda n: (scores[n], -len(presets[n])))
    return best, {"expected_accepted_drafts": scores,
                  "calibrated16": {"file": "tree.json", "choices": [list(c) for c in custom],
                                   "expected_accepted_drafts":
                                       round(expected_accepted(custom, rank_acc), 3)}}
