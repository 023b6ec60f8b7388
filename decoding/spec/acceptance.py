"""Pure acceptance rules over a verified draft tree.

Inputs share one convention: node 0 is the root (already decided), row i of `logits` /
`probs` is the base model's next-token distribution AFTER node i, and a child c of node
i is a drafted guess for that next token. Each rule returns the accepted path of node
indices (starting at the root) and the bonus token drawn from the last accepted node's
distribution, so every step gains at least one token. Two host syncs at most.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling import entropy, sample
from .tree import DraftTree


@dataclass(slots=True)
class Accepted:
    path: list[int]  # node indices, path[0] == 0 (root)
    bonus: int  # token sampled (or argmax) after the last accepted node

    @property
    def num_accepted(self) -> int:
        return len(self.path) - 1


def _longest_accepted_path(tree: DraftTree, ok: list[bool]) -> list[int]:
    """Deepest root path whose every node is accepted; ties go to the earlier node."""
    kids = tree.children()
    best: list[int] = [0]

    def dfs(node: int, path: list[int]) -> None:
        nonlocal best
        if len(path) > len(best):
            best = list(path)
        for c in kids[node]:
            if ok[c]:
                path.append(c)
                dfs(c, path)
                path.pop()

    dfs(0, [0])
    return best


def accept_greedy(logits: torch.Tensor, tree: DraftTree) -> Accepted:
    """logits: [n, V]. Accept while the draft equals the base argmax: lossless for T=0."""
    return accept_greedy_ids(logits.argmax(-1).tolist(), tree)


def accept_greedy_ids(argmax: list[int], tree: DraftTree) -> Accepted:
    """accept_greedy from the argmax of each node's logits row (the engine takes one argmax
    over the whole step's rows rather than one per sequence)."""
    kids = tree.children()
    path = [0]
    node = 0
    while True:
        nxt = next((c for c in kids[node] if tree.tokens[c] == argmax[node]), None)
        if nxt is None:
            return Accepted(path, argmax[node])
        path.append(nxt)
        node = nxt


def typical_threshold(probs: torch.Tensor, epsilon: float, delta: float) -> torch.Tensor:
    """probs: [n, V] -> [n] threshold min(epsilon, delta * exp(-H(p)))."""
    return torch.minimum(torch.full_like(probs[:, 0], epsilon), delta * torch.exp(-entropy(probs)))


def accept_typical(probs: torch.Tensor, tree: DraftTree, epsilon: float, delta: float,
                   generator: torch.Generator | None) -> Accepted:
    """probs: [n, V] temperature-processed. Medusa's typical acceptance: keep drafted x
    when p(x) > min(epsilon, delta * exp(-H(p))); keep the longest such path, then
    sample the bonus token from the last accepted node."""
    n = len(tree.tokens)
    if n > 1:
        dev = probs.device
        parents = torch.tensor(tree.parents[1:], device=dev)
        toks = torch.tensor(tree.tokens[1:], device=dev)
        p_draft = probs[parents, toks]  # [n-1]
        thr = typical_threshold(probs, epsilon, delta)[parents]
        ok = [True] + (p_draft > thr).tolist()
        path = _longest_accepted_path(tree, ok)
    else:
        path = [0]
    bonus = int(sample(probs[path[-1]], generator).item())
    return Accepted(path, bonus)


def accept_rejection(probs: torch.Tensor, tree: DraftTree,
                     generator: torch.Generator | None) -> Accepted:
    """probs: [n, V] temperature-processed. Lossless rejection sampling over a tree of
    point-mass drafts (SpecInfer-style multi-candidate): at node i with residual r
    (starting at p_i), child c is accepted with probability r(c) / sum(r); on rejection
    r(c) is zeroed and the next sibling tried; if all fail, the bonus token is sampled
    from the normalised residual. Each token's marginal is exactly p_i."""
    kids = tree.children()
    n = len(tree.tokens)
    p_draft: list[float] = []
    if n > 1:
        dev = probs.device
        parents = torch.tensor(tree.parents[1:], device=dev)
        toks = torch.tensor(tree.tokens[1:], device=dev)
        p_draft = [0.0] + probs[parents, toks].tolist()
    # Uniforms from the request's generator (on CPU: cheap, reproducible per seed).
    gen_dev = generator.device if generator is not None else torch.device("cpu")
    uniforms = torch.rand(n, generator=generator, device=gen_dev).tolist()
    path = [0]
    node = 0
    rejected: list[int] = []
    while True:
        mass = 1.0
        nxt = None
        rejected = []
        for c in kids[node]:
            p = p_draft[c]
            if mass > 0 and uniforms[c] * mass < p:
                nxt = c
                break
            mass -= p
            rejected.append(tree.tokens[c])
        if nxt is None:
            break
        path.append(nxt)
        node = nxt
    residual = probs[node]
    if rejected:
        residual = residual.clone()
        residual[torch.tensor(rejected, device=residual.device)] = 0.0
        total = residual.sum()
        # All mass rejected can only happen through rounding: fall back to p itself.
        residual = torch.where(total > 0, residual / total.clamp_min(1e-30), probs[node])
    bonus = int(sample(residual, generator).item())
    return Accepted(path, bonus)


