"""`mtpserve train-heads` (the default, `--head-type medusa`): Medusa-1 heads trained over
the hidden cache, and their evaluation.

Targets. For a sequence x, the trunk's final-normed hidden state h_t predicts x_{t+1} (at
serving time that is the verifier's bonus token). Head k (k = 1..K) reads h_t and must
guess the token after that: the base model's own greedy choice at position t+k,
argmax p_base(. | x_<=t+k) (`--targets tokens`: the data's x_{t+1+k} instead). Each head
is one residual block; the unembedding is the base model's, shared and frozen; the
softmax runs over the targets and the base model's own top-8 guesses unless `--vocab full`.

`evaluate` (top-k hit rates over the full or a draft vocabulary) is also what the joint
mode and `--draft-vocab-only` report with.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..spec.heads import MedusaHeads
from .hidden_cache import HiddenCache, split_sequences, targets_for
from .train_config import TrainConfig
from .train_loop import run_steps, top1_hits
from .vocab import build_draft_vocab, remap_targets, softmax_vocab

if TYPE_CHECKING:
    from ..model.trunk import CausalLM


def _logits(heads: MedusaHeads, unembed: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """hidden [B, H] -> [K, B, V'] float32 against unembed [V', H] (the base model's rows)."""
    return heads.head_hidden(hidden) @ unembed.T


@torch.no_grad()
def evaluate(heads: MedusaHeads, model: CausalLM, cache: HiddenCache, rows: torch.Tensor,
             tgts: torch.Tensor, max_rank: int = 10, batch: int = 512,
             vocab_ids: torch.Tensor | None = None) -> dict:
    """Per head, hit rate of each rank 0..max_rank-1 over the FULL vocabulary, or, with
    `vocab_ids` (a draft vocabulary), over those tokens only (what drafting then proposes;
    `in_vocab`: the share of targets inside it, the ceiling of any top-k)."""
    K = heads.num_heads
    unembed = model.unembed_weight().detach().float().cpu()
    if vocab_ids is not None:
        vocab_ids = vocab_ids.cpu()
        unembed = unembed[vocab_ids]
    hits = torch.zeros(K, max_rank)
    count = torch.zeros(K)
    inside = torch.zeros(K)
    member = None
    if vocab_ids is not None:
        member = torch.zeros(model.config.vocab_size, dtype=torch.bool)
        member[vocab_ids] = True
    for s in range(0, len(rows), batch):
        h = cache.hidden[rows[s:s + batch]]
        tg = tgts[s:s + batch].T  # [K, B]
        top = _logits(heads, unembed, h).topk(max_rank, dim=-1).indices  # [K, B, R]
        if vocab_ids is not None:
            top = vocab_ids[top]
        ok = tg >= 0
        eq = (top == tg[..., None]) & ok[..., None]
        hits += eq.sum(1).float()
        count += ok.sum(1).float()
        if member is not None:
            inside += (member[tg.clamp(min=0)] & ok).sum(1).float()
    rank_acc = (hits / count.clamp(min=1)[:, None])
    out = {
        "positions": int(count[0].item()) if K else 0,
        "top1": [round(float(r[0]), 4) for r in rank_acc],
        "top5": [round(float(r[:5].sum()), 4) for r in rank_acc],
        "rank_acc": [[round(float(x), 4) for x in r] for r in rank_acc],
    }
    if vocab_ids is not None:
        out["vocab"] = len(vocab_ids)
        out["in_vocab"] = [round(float(x), 4) for x in inside / count.clamp(min=1)]
    return out


def train(model: CausalLM, cache: HiddenCache, cfg: TrainConfig, out: Path, resume: bool = False,
          progress: Callable[[str], None] | None = None, default_tree: str = "tree16", draft_vocab: int = 0
          ) -> tuple[MedusaHeads, dict]:
    """Train Medusa heads over the cached hidden states; checkpoint to out/checkpoint.pt."""
    torch.manual_seed(cfg.seed)
    H, V = model.config.hidden_size, model.config.vocab_size
    heads = MedusaHeads(H, V, cfg.num_heads, cfg.num_layers, default_tree=default_tree)
    train_seqs, hold_seqs = split_sequences(cache.num_seqs, cfg.holdout_frac, cfg.seed)
    rows, tgts = targets_for(cache, train_seqs, cfg.num_heads, cfg.targets)
    h_rows, h_tgts = targets_for(cache, hold_seqs, cfg.num_heads, cfg.targets)
    if len(rows) == 0:
        raise ValueError("no trainable positions: the data is empty or too short")
    vocab_ids = None
    unembed = model.unembed_weight().detach().float().cpu()
    if cfg.vocab != "full":
        vocab_ids = softmax_vocab(cfg, unembed, cache.hidden[rows], tgts)
        sub_tgts = remap_targets(tgts, vocab_ids, V)
        unembed = unembed[vocab_ids.to(unembed.device)]
    else:
        sub_tgts = tgts
    resuming = resume and (out / "checkpoint.pt").exists()
    baseline = evaluate(MedusaHeads(H, V, cfg.num_heads, cfg.num_layers), model, cache,
                        h_rows, h_tgts) if len(h_rows) and not resuming else None

    def batch_loss(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = _logits(heads, unembed, cache.hidden[rows[idx]])  # [K, B, V']
        tg = sub_tgts[idx].T  # [K, B]
        losses = [F.cross_entropy(logits[k], tg[k], ignore_index=-1) for k in range(cfg.num_heads)]
        return torch.stack(losses).sum(), top1_hits(logits, tg)

    report = run_steps(heads, len(rows), cfg, out, resume, batch_loss, progress)
    heads.eval()
    report.update({
        "train_positions": len(rows), "train_sequences": len(train_seqs),
        "heldout_sequences": len(hold_seqs),
        "softmax_vocab": len(vocab_ids) if vocab_ids is not None else V,
    })
    if len(h_rows):
        report["heldout"] = evaluate(heads, model, cache, h_rows, h_tgts)
        if baseline is not None:
            report["heldout_untrained_identity_heads"] = {k: baseline[k] for k in ("top1", "top5")}
    if draft_vocab:
        ids, info = build_draft_vocab(cache, train_seqs, tgts, draft_vocab, V)
        if ids is not None:
            heads.set_draft_vocab(ids)
            if len(h_rows):
                info["heldout"] = evaluate(heads, model, cache, h_rows, h_tgts, vocab_ids=ids)
        report["draft_vocab"] = info
    return heads, report
