"""The default tree written with the heads after every training mode: the preset with the
most expected accepted drafts under the held-out rank accuracies, and a calibrated 16-node
choice list in OUT/tree.json. The pure functions it rests on (expected_accepted,
calibrated_tree, on_chain) live in spec/tree_choice.py, which `mtpserve bench` ranks with too.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..spec.tree import PRESETS
from ..spec.tree_choice import calibrated_tree, expected_accepted, on_chain


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
