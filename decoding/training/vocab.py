"""Token subsets used in training: the vocabulary the training softmax runs over, targets
remapped to its columns, and the draft vocabulary (FR-Spec style) saved with the heads.

Why together: all three answer "which tokens are scored", and every head type (Medusa,
sequential, joint) builds them the same way from the hidden cache and its targets.
"""

from __future__ import annotations

import torch

from .hidden_cache import HiddenCache
from .train_config import TrainConfig


@torch.no_grad()
def softmax_vocab(cfg: TrainConfig, unembed: torch.Tensor, hidden: torch.Tensor,
                  tgts: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """The tokens the training softmax runs over. `targets` alone lets heads promote
    tokens never seen as targets (nothing pushes them down), which costs held-out accuracy
    over the full vocabulary; adding the base model's own top-k at every training
    position (`plausible`) gives nearly full-softmax accuracy at a fraction of its cost."""
    parts = [tgts[tgts >= 0]]
    if cfg.vocab == "plausible":
        for i in range(0, len(hidden), chunk):
            parts.append((hidden[i:i + chunk] @ unembed.T).topk(cfg.plausible_topk, -1).indices.flatten())
    return torch.unique(torch.cat(parts))


def remap_targets(tgts: torch.Tensor, vocab_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Token ids -> their column in a softmax over `vocab_ids` (-1 stays -1)."""
    remap = torch.full((vocab_size,), -1, dtype=torch.long)
    remap[vocab_ids] = torch.arange(len(vocab_ids))
    return torch.where(tgts >= 0, remap[tgts.clamp(min=0)], tgts)


def build_draft_vocab(cache: HiddenCache, seqs: list[int], tgts: torch.Tensor, top_n: int,
                      vocab_size: int) -> tuple[torch.Tensor | None, dict]:
    """The `top_n` most frequent answer tokens of sequences `seqs` (the data's next tokens
    at trained positions; ties: lower id first) plus every head target in `tgts` (so no
    training target is undraftable) -> sorted int64 ids and a summary for heads.json.
    None (full vocabulary) when top_n is 0 or the result would cover the whole vocabulary."""
    parts = []
    for s in seqs:
        a, b = int(cache.seq_start[s]), int(cache.seq_start[s + 1])
        t = cache.tokens[a + int(cache.train_from[s]):b - 1]
        parts.append(t[t >= 0])
    answer = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
    counts = torch.bincount(answer, minlength=vocab_size)
    info = {"top_n": top_n, "answer_tokens": int(answer.numel()),
            "distinct_answer_tokens": int((counts > 0).sum())}
    if top_n <= 0:
        return None, info | {"size": vocab_size}
    order = torch.sort(counts, descending=True, stable=True).indices
    top = order[:min(top_n, int((counts > 0).sum()))]
    target_ids = torch.unique(tgts[tgts >= 0])
    ids = torch.unique(torch.cat([top, target_ids]))  # sorted
    info |= {"size": int(ids.numel()), "head_target_ids": int(target_ids.numel()),
             "added_by_targets": int(ids.numel() - top.numel()),
             "answer_token_coverage": round(float(counts[ids].sum()) / max(1, answer.numel()), 4)}
    if ids.numel() >= vocab_size:
        return None, info
    return ids, info
