"""Choosing a draft tree from the heads' held-out accuracies (pure functions): the
expected accepted drafts of a tree, Medusa's greedy calibrated tree, the candidate trees
of a heads folder, and their ranking by expected speed over plain decoding given measured
verify and drafting costs.

Why here (spec/): training picks the default tree it writes with the heads
(training/tree_choice.py), `mtpserve bench --calibrate-tree` prints the ranking
(tools/bench/tree_calibration.py), and the engine calibrates `--tree auto` at its first
start on a machine (engine/tree_autotune.py): all three read these.
"""

from __future__ import annotations

import math

from .tree import PRESETS


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


def tree_candidates(rank_acc: list[list[float]], max_nodes: int = 16, chain_only: bool = False
                    ) -> dict[str, list[tuple[int, ...]]]:
    """The presets plus the Medusa-calibrated trees of every size up to max_nodes
    (chain_only: sequential heads, trees that branch off the top-1 chain)."""
    out = {name: list(ch) for name, ch in PRESETS.items()
           if all(len(c) <= len(rank_acc) for c in ch) and (not chain_only or on_chain(ch))}
    for n in range(1, max_nodes + 1):
        out[f"calibrated{n}"] = calibrated_tree(rank_acc, n, chain_only)
    return out


def tree_depth(choices: list[tuple[int, ...]]) -> int:
    """How deep a tree drafts: its longest path (the chain depth drafting must reach)."""
    return max(len(c) for c in choices)


def monotone_costs(verify_ms: dict[int, float]) -> dict[int, float]:
    """Measured verify costs per pass size made non-decreasing (pure): a pass of k rows is
    priced at the cheapest pass of k or more rows measured. A pass never does less work
    than a smaller one (the compiled step even pads one row to two), so a smaller pass
    timed dearer than a bigger one is the machine's noise; left in, one slow moment at a
    first start (k=1 8.66 ms against k=2 7.34 once) makes every tree look cheap against
    plain decoding, and the choice is cached for good."""
    out, floor = {}, math.inf
    for k in sorted(verify_ms, reverse=True):
        floor = min(floor, verify_ms[k])
        out[k] = floor
    return dict(sorted(out.items()))


def rank_trees(candidates: dict[str, list[tuple[int, ...]]], rank_acc: list[list[float]],
               verify_ms: dict[int, float], draft_ms: float | dict[int, float]) -> list[dict]:
    """Expected tokens per second of each tree relative to plain decoding (pure).
    draft_ms: the heads' drafting time, or per tree depth (sequential heads run once
    per depth)."""
    plain = verify_ms[1]
    rows = []
    for name, choices in candidates.items():
        k = 1 + len(choices)
        tokens = 1 + expected_accepted(choices, rank_acc)
        depth = tree_depth(choices)
        ms = verify_ms[k] + (draft_ms[depth] if isinstance(draft_ms, dict) else draft_ms)
        rows.append({"tree": name, "nodes": k, "tokens_per_step": round(tokens, 3),
                     "step_ms": round(ms, 2), "speedup_vs_plain": round(tokens * plain / ms, 3),
                     "choices": [list(c) for c in choices]})
    return sorted(rows, key=lambda r: -r["speedup_vs_plain"])


def deeper_trees_can_win(candidates: dict[str, list[tuple[int, ...]]],
                         rank_acc: list[list[float]], verify_ms: dict[int, float],
                         draft_ms: dict[int, float], depth: int) -> bool:
    """Whether a candidate drafting `depth` or more deep could beat the best shallower one
    (pure). draft_ms holds depths 1..depth-1; a deeper draft runs the shallower chain
    first, so it costs at least draft_ms[depth-1]: charged just that, a deep tree that
    still loses cannot win, and --tree auto need not time (nor compile) deeper drafts."""
    deep = {n: c for n, c in candidates.items() if tree_depth(c) >= depth}
    shallow = {n: c for n, c in candidates.items() if tree_depth(c) < depth}
    if not deep or not shallow:
        return bool(deep)
    best = rank_trees(shallow, rank_acc, verify_ms, draft_ms)[0]["speedup_vs_plain"]
    deepest = max(map(tree_depth, deep.values()))
    bound = {**draft_ms, **{d: draft_ms[depth - 1] for d in range(depth, deepest + 1)}}
    return rank_trees(deep, rank_acc, verify_ms, bound)[0]["speedup_vs_plain"] > best
