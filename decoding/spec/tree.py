"""Draft trees: nodes in topological order, node 0 is the root (the last decided token).

A tree is just tokens + parent indices; from that come the rotary depths, the ancestor
mask used by tree attention and the children lists acceptance walks. Pure, host-side:
trees are at most a few dozen nodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Medusa-style choice lists: each tuple is a path of top-k ranks, one rank per depth
# (rank r at depth d = the r-th most likely token of head d). Presets from a plain chain
# to sparse trees; "auto" picks by measured acceptance (see engine).
PRESETS: dict[str, list[tuple[int, ...]]] = {
    "chain2": [(0,), (0, 0)],
    "chain4": [(0,), (0, 0), (0, 0, 0), (0, 0, 0, 0)],
    "tree8": [(0,), (1,), (2,), (0, 0), (1, 0), (0, 1), (0, 0, 0), (0, 0, 0, 0)],
    "tree16": [(0,), (1,), (2,), (3,), (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0),
               (0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0), (0, 0, 0, 0), (0, 0, 0, 0, 0)],
}


@dataclass(slots=True)
class DraftTree:
    tokens: list[int]  # tokens[0] is the root token
    parents: list[int]  # parents[0] == -1; parents[i] < i
    depths: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.parents) or not self.tokens or self.parents[0] != -1:
            raise ValueError("a draft tree needs a root (parent -1) and one parent per token")
        if not self.depths:
            self.depths = [0] * len(self.tokens)
            for i in range(1, len(self.tokens)):
                p = self.parents[i]
                if not 0 <= p < i:
                    raise ValueError(f"node {i}: parent {p} must precede it")
                self.depths[i] = self.depths[p] + 1

    @classmethod
    def root_only(cls, root: int) -> DraftTree:
        return cls([root], [-1], [0])

    @property
    def num_drafts(self) -> int:
        return len(self.tokens) - 1

    @property
    def max_depth(self) -> int:
        return max(self.depths)

    def children(self) -> list[list[int]]:
        kids: list[list[int]] = [[] for _ in self.tokens]
        for i in range(1, len(self.tokens)):
            kids[self.parents[i]].append(i)
        return kids

    def ancestor_mask(self) -> torch.Tensor:
        """[n, n] bool: mask[i, j] is True when j is i or an ancestor of i."""
        n = len(self.tokens)
        m = torch.zeros(n, n, dtype=torch.bool)
        for i in range(n):
            j = i
            while j != -1:
                m[i, j] = True
                j = self.parents[j]
        return m

    def add_path(self, tokens: list[int], start: int = 0) -> None:
        """Insert a chain of tokens below node `start`, sharing existing nodes (a trie)."""
        kids = self.children()
        node = start
        for tok in tokens:
            nxt = next((c for c in kids[node] if self.tokens[c] == tok), None)
            if nxt is None:
                self.tokens.append(tok)
                self.parents.append(node)
                self.depths.append(self.depths[node] + 1)
                kids.append([])
                kids[node].append(len(self.tokens) - 1)
                nxt = len(self.tokens) - 1
            node = nxt

    def truncated(self, max_nodes: int) -> DraftTree:
        """Keep the first max_nodes nodes (topological order keeps parents first)."""
        n = max(1, min(max_nodes, len(self.tokens)))
        return DraftTree(self.tokens[:n], self.parents[:n], self.depths[:n])


def tree_from_choices(root: int, choices: list[tuple[int, ...]],
                      topk_tokens: list[list[int]]) -> DraftTree:
    """Fill a choice list with per-depth top-k candidates: topk_tokens[d][r]."""
    tree = DraftTree.root_only(root)
    for path in sorted(choices, key=lambda c: (len(c), c)):
        if len(path) > len(topk_tokens) or any(r >= len(topk_tokens[d]) for d, r in enumerate(path)):
            continue
        tree.add_path([topk_tokens[d][r] for d, r in enumerate(path)])
    return tree


def tree_from_sequential(root: int, choices: list[tuple[int, ...]],
                         candidates: dict[tuple[int, ...], list[int]]) -> DraftTree:
    """For chained heads: candidates[prefix of ranks] -> top-k tokens after that prefix."""
    tree = DraftTree.root_only(root)
    for path in sorted(choices, key=lambda c: (len(c), c)):
        toks = []
        for d in range(len(path)):
            cand = candidates.get(path[:d])
            if cand is None or path[d] >= len(cand):
                break
            toks.append(cand[path[d]])
        else:
            tree.add_path(toks)
    return tree


def load_choices(spec: str) -> list[tuple[int, ...]]:
    """A preset name or a JSON file with a list of rank paths."""
    if spec in PRESETS:
        return list(PRESETS[spec])
    import json
    import os

    if not os.path.isfile(spec):
        raise ValueError(f"unknown tree {spec!r}: not a preset ({', '.join(PRESETS)}) or a file")
    try:
        raw = json.loads(open(spec).read())
        choices = [tuple(int(r) for r in path) for path in raw]
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{spec}: a tree file is a JSON list of lists of ranks ({exc})") from None
    for c in choices:
        if not c or any(r < 0 for r in c) or (len(c) > 1 and c[:-1] not in choices):
            raise ValueError(f"{spec}: path {list(c)} is empty, negative or lacks its parent path")
    return choices
