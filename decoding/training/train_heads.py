"""`mtpserve train-heads`: Medusa-1 draft heads by self-distillation on a frozen trunk.

Targets. For a sequence x, the trunk's final-normed hidden state h_t predicts x_{t+1} (at
serving time that is the verifier's bonus token). Head k (k = 1..K) reads h_t and must
guess the token after that: the base model's own greedy choice at position t+k,
argmax p_base(. | x_<=t+k). On text the model generated greedily itself (the default
recipe: its answers to chat prompts) that is simply x_{t+1+k}; on other text it is what
the base would have said there (`--targets tokens` trains on the data's tokens instead).

Steps: read sources -> let the model answer prompts (engine, greedy, speculation off;
cached in a JSONL) -> run the frozen trunk once over every sequence and cache h_t and the
base argmax -> train the heads over that cache for several epochs (cheap: one residual
block per head; the unembedding is the base model's, shared and frozen; the softmax
runs over the targets and the base model's own top-8 guesses unless `--vocab full`) ->
evaluate top-1/top-5 on a held-out split over the FULL vocabulary -> build a draft
vocabulary (`--draft-vocab N`, FR-Spec style: the N most frequent answer tokens of the
training split plus every head target seen in training) and evaluate again restricted to
it -> pick a tree -> save in the project format. `--draft-vocab-only` adds (or replaces)
the draft vocabulary of heads already in OUT without training.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..spec.heads import MedusaHeads
from ..spec.heads_io import add_draft_vocab, load_heads, save_project_heads
from ..spec.tree import PRESETS
from .heads_data import Example, generate_answers, read_sources

log = logging.getLogger(__name__)


# -- config ------------------------------------------------------------------------------
@dataclass(slots=True)
class TrainConfig:
    head_type: str = "medusa"  # medusa | sequential (train_sequential.py)
    num_heads: int = 4  # medusa: heads; sequential: chain depths trained
    num_layers: int = 1
    epochs: int = 6
    lr: float = 3e-3
    weight_decay: float = 0.0
    batch_tokens: int = 1024  # positions per optimizer step
    seed: int = 0
    checkpoint_every: int = 50  # steps; 0: only at the end
    holdout_frac: float = 0.05
    targets: str = "argmax"  # argmax: base's greedy choice at t+k; tokens: x_{t+1+k}
    vocab: str = "plausible"  # softmax over: targets + base top-k (plausible) | targets | full
    plausible_topk: int = 8
    warmup_steps: int = 20
    attention: str = "chain"  # sequential: chain (draft chain only) | context (mtp_context.py)

    def __post_init__(self) -> None:
        if self.num_heads < 1 or self.num_layers < 1:
            raise ValueError("need num_heads >= 1 and num_layers >= 1")
        if self.epochs < 1 or self.batch_tokens < 1 or self.lr <= 0:
            raise ValueError("need epochs >= 1, batch_tokens >= 1, lr > 0")
        if not 0.0 <= self.holdout_frac < 1.0:
            raise ValueError("holdout_frac must be in [0, 1)")
        if self.head_type not in ("medusa", "sequential"):
            raise ValueError("head_type must be medusa or sequential")
        if self.attention not in ("context", "chain"):
            raise ValueError("attention must be context or chain")
        if self.targets not in ("argmax", "tokens") or \
                self.vocab not in ("plausible", "targets", "full"):
            raise ValueError("targets must be argmax|tokens, vocab plausible|targets|full")


# -- the frozen trunk, run once ------------------------------------------------------------
@dataclass(slots=True)
class HiddenCache:
    hidden: torch.Tensor  # [N, H] float32: h_t of every cached position
    argmax: torch.Tensor  # [N] int64: base greedy prediction after position t (for x_{t+1})
    tokens: torch.Tensor  # [N] int64: x_{t+1} (the data's next token; -1 at a sequence end)
    seq_start: torch.Tensor  # [S + 1] int64: sequence s occupies [seq_start[s], seq_start[s+1])
    train_from: torch.Tensor  # [S] int64: first trained position, relative to its sequence

    @property
    def num_seqs(self) -> int:
        return len(self.train_from)


def _causal_meta(n: int, device: torch.device):
    from ..model.attention_metadata import AttentionMetadata

    ar = torch.arange(n, device=device)
    return AttentionMetadata(
        positions=ar, token_slots=torch.zeros_like(ar), token_store=ar,
        seq_slots=torch.zeros(1, dtype=torch.long, device=device), slot_start=0, kv_len=n,
        num_seqs=1, q_len=n, q_gather=None, q_scatter=None,
        mask=torch.ones(n, n, dtype=torch.bool, device=device).tril_()[None, None])


def chunk_examples(examples: list[Example], seq_len: int) -> list[Example]:
    """Split long sequences into windows of seq_len (positions restart in each)."""
    out = []
    for ex in examples:
        if len(ex.ids) < 2:
            continue
        for s in range(0, len(ex.ids), seq_len):
            ids = ex.ids[s:s + seq_len]
            if len(ids) >= 2 and s + len(ids) - 1 > ex.train_from:
                out.append(Example(ids, max(0, ex.train_from - s)))
    return out


@torch.no_grad()
def cache_hidden(model, examples: list[Example], progress=None) -> HiddenCache:
    from ..model.kv_cache import KVCache

    dev = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    hid, amax, nxt, starts, train_from = [], [], [], [0], []
    longest = max(len(e.ids) for e in examples)
    kv = KVCache(model.config, 1, longest, dtype, dev)
    t0 = time.perf_counter()
    for i, ex in enumerate(examples):
        ids = torch.tensor(ex.ids, dtype=torch.long, device=dev)
        h = model(ids, _causal_meta(len(ex.ids), dev), kv)
        hid.append(h.float().cpu())
        amax.append(model.compute_logits(h).argmax(-1).cpu())
        nxt.append(torch.tensor(ex.ids[1:] + [-1]))
        starts.append(starts[-1] + len(ex.ids))
        train_from.append(ex.train_from)
        if progress and (i + 1) % 25 == 0:
            progress(f"trunk pass {i + 1}/{len(examples)} sequences, {starts[-1]} positions, "
                     f"{time.perf_counter() - t0:.0f} s")
    return HiddenCache(torch.cat(hid), torch.cat(amax), torch.cat(nxt),
                       torch.tensor(starts), torch.tensor(train_from))


def targets_for(cache: HiddenCache, seqs: list[int], num_heads: int, mode: str
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Trainable positions of `seqs` and their targets: -> rows [M], targets [M, K]
    (-1 where t+k runs past the sequence)."""
    rows, tgts = [], []
    src = cache.argmax if mode == "argmax" else cache.tokens
    for s in seqs:
        a, b = int(cache.seq_start[s]), int(cache.seq_start[s + 1])
        first = a + int(cache.train_from[s])
        # head k at t reads target src[t + k]; the last usable t has t + 1 < b.
        t = torch.arange(first, b - 1)
        if len(t) == 0:
            continue
        k = torch.arange(1, num_heads + 1)
        idx = t[:, None] + k[None, :]  # [M, K]
        valid = idx < b
        tg = src[idx.clamp(max=b - 1)]
        if mode == "tokens":
            valid &= tg >= 0
        rows.append(t)
        tgts.append(torch.where(valid, tg, torch.full_like(tg, -1)))
    if not rows:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, num_heads, dtype=torch.long)
    return torch.cat(rows), torch.cat(tgts)


def split_sequences(n: int, frac: float, seed: int) -> tuple[list[int], list[int]]:
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g).tolist()
    n_hold = int(round(n * frac)) if n > 1 else 0
    if frac > 0 and n > 1:
        n_hold = max(1, n_hold)
    return sorted(perm[n_hold:]), sorted(perm[:n_hold])


# -- training ------------------------------------------------------------------------------
def _logits(heads: MedusaHeads, unembed: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """hidden [B, H] -> [K, B, V'] float32 against unembed [V', H] (the base model's rows)."""
    return heads.head_hidden(hidden) @ unembed.T


@torch.no_grad()
def evaluate(heads: MedusaHeads, model, cache: HiddenCache, rows: torch.Tensor,
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


# -- draft vocabulary (FR-Spec style) --------------------------------------------------------
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


def _lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


def train(model, cache: HiddenCache, cfg: TrainConfig, out: Path, resume: bool = False,
          progress=None, default_tree: str = "tree16", draft_vocab: int = 0
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


def remap_targets(tgts: torch.Tensor, vocab_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Token ids -> their column in a softmax over `vocab_ids` (-1 stays -1)."""
    remap = torch.full((vocab_size,), -1, dtype=torch.long)
    remap[vocab_ids] = torch.arange(len(vocab_ids))
    return torch.where(tgts >= 0, remap[tgts.clamp(min=0)], tgts)


@torch.no_grad()
def top1_hits(logits: torch.Tensor, tg: torch.Tensor) -> torch.Tensor:
    """logits [K, B, V'], targets [K, B] (-1: none) -> top-1 accuracy per head [K]."""
    ok = tg >= 0
    return ((logits.argmax(-1) == tg) & ok).sum(1).float() / ok.sum(1).clamp(min=1)


def run_steps(module: torch.nn.Module, num_rows: int, cfg: TrainConfig, out: Path,
              resume: bool, batch_loss, progress=None, batch_size: int | None = None) -> dict:
    """The optimisation both head types share: AdamW with warmup + cosine decay over
    `cfg.epochs` shuffled passes of `num_rows` training items (positions; whole sequences
    with `batch_size` of them per step), `batch_loss(idx) -> (loss, top-1 per depth)` on
    each batch, checkpoints of (weights, optimizer, step) in out/checkpoint.pt, and
    `resume` from it (refused when settings or data differ)."""
    opt = torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_step = batch_size or cfg.batch_tokens
    steps_per_epoch = math.ceil(num_rows / per_step)
    total = steps_per_epoch * cfg.epochs
    step = 0
    ckpt = out / "checkpoint.pt"
    if resume and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        if state["config"] != asdict(cfg) or state["train_positions"] != num_rows:
            raise ValueError(f"{ckpt}: was written with other settings or data "
                             f"({state['config']}, {state['train_positions']} positions)")
        module.load_state_dict(state["heads"])
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
        (progress or log.info)(f"resumed from {ckpt} at step {step}/{total}")

    def save_ckpt() -> None:
        out.mkdir(parents=True, exist_ok=True)
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"heads": module.state_dict(), "optimizer": opt.state_dict(), "step": step,
                    "config": asdict(cfg), "train_positions": num_rows}, tmp)
        tmp.replace(ckpt)

    bar = _bar(total, step)
    t0 = time.perf_counter()
    ema_loss, ema_acc = None, None
    module.train()
    while step < total:
        epoch, within = divmod(step, steps_per_epoch)
        perm = torch.randperm(num_rows, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        idx = perm[within * per_step:(within + 1) * per_step]
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, total, cfg)
        loss, acc = batch_loss(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        ema_loss = loss.item() if ema_loss is None else 0.9 * ema_loss + 0.1 * loss.item()
        ema_acc = acc if ema_acc is None else 0.9 * ema_acc + 0.1 * acc
        bar.update(step, f"epoch {epoch + 1}/{cfg.epochs} loss {ema_loss:.3f} top1 "
                         + " ".join(f"{a:.2f}" for a in ema_acc.tolist()))
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total:
            save_ckpt()
    bar.close()
    save_ckpt()
    return {"steps": total, "steps_per_epoch": steps_per_epoch,
            "train_seconds_this_run": round(time.perf_counter() - t0, 1),
            "final_train_loss_ema": round(ema_loss, 4) if ema_loss is not None else None}


class _bar:
    """tqdm when installed, else a log line every ~5% of the steps."""

    def __init__(self, total: int, initial: int) -> None:
        self.total, self.last = total, initial
        try:
            from tqdm import tqdm

            self.t = tqdm(total=total, initial=initial, desc="train heads", dynamic_ncols=True)
        except ImportError:
            self.t = None

    def update(self, step: int, text: str) -> None:
        if self.t is not None:
            self.t.update(step - self.last)
            self.t.set_postfix_str(text, refresh=False)
        elif step == self.total or step % max(1, self.total // 20) == 0:
            log.info("step %d/%d %s", step, self.total, text)
        self.last = step

    def close(self) -> None:
        if self.t is not None:
            self.t.close()


# -- tree choice ---------------------------------------------------------------------------
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


# -- CLI -----------------------------------------------------------------------------------
def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="GGUF file or HF folder (default: embedded model)")
    p.add_argument("--data", nargs="+", required=True,
                   help=".py/.txt/.md files or folders; JSONL of {text}, {prompt} / {messages} "
                        "(answered by the model) or {prompt_ids, completion_ids}")
    p.add_argument("--out", required=True, help="output folder: heads.json, heads.safetensors, "
                                                "checkpoints, caches")
    p.add_argument("--head-type", default="medusa", choices=["medusa", "sequential"],
                   help="medusa: one residual block per future token, all from h_t; "
                        "sequential: one DeepSeek/EAGLE-style module that also reads the "
                        "token it just drafted, run once per depth (train_sequential.py)")
    p.add_argument("--module-attention", default="chain", choices=["chain", "context"],
                   help="sequential: what the module attends over: the draft chain only "
                        "(chain), or also its own entries at every earlier position (context, "
                        "as EAGLE/DeepSeek; on the embedded model's ~170k training tokens it "
                        "generalised worse, docs/benchmarks.md)")
    p.add_argument("--num-heads", type=int, default=4,
                   help="medusa: heads; sequential: chain depths trained")
    p.add_argument("--num-layers", type=int, default=1, help="residual blocks per head (medusa)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-tokens", type=int, default=1024, help="positions per optimizer step")
    p.add_argument("--seq-len", type=int, default=1024, help="trunk window for long texts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
    p.add_argument("--holdout-frac", type=float, default=0.05, help="sequences held out for the report")
    p.add_argument("--generate-max-tokens", type=int, default=256, help="answer length for prompts")
    p.add_argument("--generated", default=None,
                   help="JSONL cache of the model's answers (default OUT/answers.jsonl)")
    p.add_argument("--gen-batch", type=int, default=16, help="max_num_seqs while answering")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"],
                   help="trunk dtype for answering and the hidden-state pass (heads train in fp32)")
    p.add_argument("--targets", default="argmax", choices=["argmax", "tokens"],
                   help="argmax: the base model's greedy choice (self-distillation); tokens: the data")
    p.add_argument("--vocab", default="plausible", choices=["plausible", "targets", "full"],
                   help="training softmax over the targets plus the base model's top-8 at every "
                        "position (default), the targets only, or the full vocabulary (slow); "
                        "held-out accuracy is always over the full vocabulary")
    p.add_argument("--draft-vocab", type=int, default=8192, metavar="N",
                   help="draft vocabulary: heads draft only from the N most frequent answer "
                        "tokens of the training split plus every head target seen in training "
                        "(stored in heads.safetensors; 0: the full vocabulary)")
    p.add_argument("--draft-vocab-only", action="store_true",
                   help="do not train: add (or replace) the draft vocabulary of the heads "
                        "already in OUT, built from the same --data/--generated (nothing is "
                        "generated) and the split in OUT/heads.json; prints held-out accuracy "
                        "over the full and the draft vocabulary")
    p.add_argument("--init-heads", default=None, metavar="DIR",
                   help="sequential: start from these heads' module weights (e.g. train "
                        "--module-attention chain first, then context from its output)")
    p.add_argument("--hidden-cache", default=None,
                   help="trunk hidden-state cache, reused while the data is the same "
                        "(default OUT/hidden_cache.pt)")
    j = p.add_argument_group("joint fine-tuning (train_joint.py)")
    j.add_argument("--joint", action="store_true",
                   help="train the trunk together with Medusa heads (no hidden cache: trunk "
                        "forward+backward every step; targets are the data's tokens); writes "
                        "the fine-tuned model to OUT/model, which the heads then belong to")
    j.add_argument("--curriculum", default="forward", choices=["forward", "none"],
                   help="--joint: forward: next-token loss first, heads switched on one after "
                        "another over the ramp; none: every head from step 0")
    j.add_argument("--curriculum-ramp", type=float, default=0.5, metavar="FRAC",
                   help="--joint: share of the steps over which the heads switch on")
    j.add_argument("--trunk-lr", type=float, default=1e-5,
                   help="--joint: trunk learning rate (the heads keep --lr)")
    j.add_argument("--trunk-layers", type=int, default=None, metavar="N",
                   help="--joint: train the last N decoder layers and the final norm "
                        "(default: all); embedding and unembedding stay frozen")
    j.add_argument("--max-steps", type=int, default=0, metavar="N",
                   help="--joint: stop after N steps, the lr schedule and curriculum laid out "
                        "for N (0: all epochs)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def _data_key(examples: list[Example]) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.train_from, e.ids]).encode())
    return h.hexdigest()[:16]


def _example_keys(examples: list[Example]) -> list[str]:
    return [hashlib.sha256(json.dumps([e.train_from, e.ids]).encode()).hexdigest()[:16]
            for e in examples]


def _first_sequences(cache: HiddenCache, n: int) -> HiddenCache:
    end = int(cache.seq_start[n])
    return HiddenCache(cache.hidden[:end], cache.argmax[:end], cache.tokens[:end],
                       cache.seq_start[:n + 1], cache.train_from[:n])


def _joined(a: HiddenCache, b: HiddenCache) -> HiddenCache:
    return HiddenCache(torch.cat([a.hidden, b.hidden]), torch.cat([a.argmax, b.argmax]),
                       torch.cat([a.tokens, b.tokens]),
                       torch.cat([a.seq_start, b.seq_start[1:] + a.seq_start[-1]]),
                       torch.cat([a.train_from, b.train_from]))


def _hidden_cache(model, examples: list[Example], path: Path, say) -> tuple[HiddenCache, dict]:
    """Run the trunk once and keep the result in `path`; reuse it while the data is the
    same. Data that only adds sequences after the cached ones (a new --data file at the
    end) reuses the cached ones and runs the trunk on the new ones alone."""
    key, keys = _data_key(examples), _example_keys(examples)
    saved = torch.load(path, weights_only=False) if path.exists() else {}
    if saved.get("key") == key:
        say(f"hidden states: reusing {path}")
        return HiddenCache(**saved["cache"]), {"reused": str(path), "seconds": saved.get("seconds")}
    old_keys = saved.get("example_keys", [])
    n = 0
    while n < min(len(old_keys), len(keys)) and old_keys[n] == keys[n]:
        n += 1
    t0 = time.perf_counter()
    cache = cache_hidden(model, examples[n:], progress=say) if n < len(examples) else None
    if n:
        say(f"hidden states: reusing {n} of {len(examples)} sequences from {path}")
        prefix = _first_sequences(HiddenCache(**saved["cache"]), n)
        cache = prefix if cache is None else _joined(prefix, cache)
    seconds = round(time.perf_counter() - t0, 1) + ((saved.get("seconds") or 0.0) if n else 0.0)
    torch.save({"key": key, "example_keys": keys, "seconds": seconds,
                "cache": {f: getattr(cache, f) for f in HiddenCache.__slots__}}, path)
    info: dict = {"seconds": seconds}
    if n:
        info["reused_sequences"] = n
    return cache, info


def _agreement(cache: HiddenCache) -> dict:
    """Trained positions, and how often the base argmax equals the data's next token there
    (1.0 on the model's own greedy answers: the trunk pass reproduces the generation)."""
    same, n = 0, 0
    for s in range(cache.num_seqs):
        a = int(cache.seq_start[s] + cache.train_from[s])
        b = int(cache.seq_start[s + 1]) - 1
        same += int((cache.argmax[a:b] == cache.tokens[a:b]).sum())
        n += max(0, b - a)
    return {"trained_positions": n, "argmax_equals_next_token": round(same / max(1, n), 4)}


def run_train_heads(a: argparse.Namespace) -> int:
    from ..config import EngineConfig, SpecConfig
    from ..engine.llm_engine import LLMEngine

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    torch.set_num_threads(a.threads)
    cfg = TrainConfig(head_type=a.head_type, num_heads=a.num_heads, num_layers=a.num_layers, epochs=a.epochs, lr=a.lr,
                      batch_tokens=a.batch_tokens, seed=a.seed, checkpoint_every=a.checkpoint_every,
                      holdout_frac=a.holdout_frac, targets=a.targets, vocab=a.vocab,
                      attention=a.module_attention)
    if a.joint or a.max_steps:
        from .train_joint import check_joint_args

        check_joint_args(a)  # before the model loads
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    engine = LLMEngine.from_config(EngineConfig(
        model=a.model, dtype=a.dtype, device=a.device, weights="dense", max_num_seqs=a.gen_batch,
        max_model_len=2048, spec=SpecConfig(mode="off")))
    model = engine.model
    src = read_sources(a.data, engine.tokenizer)
    recipe = {"sources": src.recipe}
    examples = list(src.examples)
    if a.draft_vocab_only:
        return _run_draft_vocab_only(a, engine, src, out, say)
    if a.init_heads and cfg.head_type != "sequential":
        raise ValueError("--init-heads is for --head-type sequential")
    if src.prompts:
        cache_path = Path(a.generated) if a.generated else out / "answers.jsonl"
        answers, stats = generate_answers(engine, src.prompts, cache_path, a.generate_max_tokens,
                                          chunk=4 * a.gen_batch, progress=say)
        examples += answers
        recipe["generation"] = {"cache": str(cache_path), "max_tokens": a.generate_max_tokens,
                                "greedy": True, "dtype": a.dtype, "max_num_seqs": a.gen_batch,
                                "chat_template": True, **stats}
    examples = chunk_examples(examples, a.seq_len)
    if a.joint:
        from .train_joint import run_joint

        return run_joint(a, cfg, engine, examples, recipe, out, say, t_all)
    hidden_path = Path(a.hidden_cache) if a.hidden_cache else out / "hidden_cache.pt"
    cache, trunk = _hidden_cache(model, examples, hidden_path, say)
    recipe.update(sequences=cache.num_seqs, positions=int(cache.seq_start[-1]), **_agreement(cache))
    sequential = cfg.head_type == "sequential"
    if sequential:
        from ..spec.mtp_sequential import SequentialMTPHeads
        from .train_sequential import train_sequential

        init = None
        if a.init_heads:
            from ..spec.heads_io import load_heads

            init = load_heads(Path(a.init_heads), model.config)
            if not isinstance(init, SequentialMTPHeads) or len(init.mods) != 1:
                raise ValueError(f"--init-heads {a.init_heads}: not one sequential module")
            recipe["init_heads"] = str(a.init_heads)
        heads, report = train_sequential(model, cache, cfg, out, resume=a.resume, progress=say,
                                         draft_vocab=a.draft_vocab, init=init)
    else:
        heads, report = train(model, cache, cfg, out, resume=a.resume, progress=say,
                              draft_vocab=a.draft_vocab)
    tree_info: dict = {}
    if "heldout" in report:
        # The tree is calibrated on what drafting will propose: the draft vocabulary's
        # accuracies when there is one.
        ranks = report.get("draft_vocab", {}).get("heldout", report["heldout"])["rank_acc"]
        best, tree_info = choose_tree(ranks, out, chain_only=sequential, topk=heads.topk)
        heads.default_tree = best
    method = (f"sequential (DeepSeek-style module, one for all depths, {cfg.attention} "
              "attention) " if sequential else "medusa-1 ")
    training = {
        "command": _command(),
        "method": method + "self-distillation: frozen trunk, shared frozen unembedding, "
                  f"targets={cfg.targets}",
        "base_model": engine.model_name, "config": asdict(cfg), "data": recipe,
        "trunk_pass": trunk, "total_seconds_this_run": round(time.perf_counter() - t_all, 1),
        "torch": torch.__version__, "tree": tree_info, **report,
    }
    save_project_heads(heads, out, model.config, training=training)
    ho = report.get("heldout")
    if ho:
        _say_heldout(say, ho, report.get("draft_vocab", {}).get("heldout"))
        say(f"default tree: {heads.default_tree} (expected accepted drafts per step: "
            f"{tree_info['expected_accepted_drafts']})")
    if "draft_vocab" in report:
        say(f"draft vocabulary: {report['draft_vocab']['size']} tokens")
    say(f"wrote {out / 'heads.json'} and {out / 'heads.safetensors'}")
    return 0


def _command() -> str:
    if len(sys.argv) > 1 and sys.argv[1] == "train-heads":
        return "mtpserve train-heads " + " ".join(shlex.quote(x) for x in sys.argv[2:])
    return " ".join(map(shlex.quote, sys.argv))


def _say_heldout(say, full: dict, draft: dict | None) -> None:
    for k in range(len(full["top1"])):
        line = f"head {k + 1}: held-out top-1 {full['top1'][k]:.3f} top-5 {full['top5'][k]:.3f}"
        if draft:
            line += (f" | draft vocab ({draft['vocab']}) top-1 {draft['top1'][k]:.3f} top-5 "
                     f"{draft['top5'][k]:.3f}, targets inside {draft['in_vocab'][k]:.3f}")
        say(line)


def _run_draft_vocab_only(a: argparse.Namespace, engine, src, out: Path, say) -> int:
    """Add a draft vocabulary to the heads in OUT, built from the data they were trained on
    (same split: holdout_frac, seed and targets from OUT/heads.json when recorded)."""
    from .heads_data import _key

    if a.draft_vocab <= 0:
        raise ValueError("--draft-vocab-only needs --draft-vocab N with N > 0")
    if a.head_type != "medusa":
        raise ValueError("--draft-vocab-only re-evaluates Medusa heads; sequential heads "
                         "build their draft vocabulary while training")
    meta_path = out / "heads.json"
    if not meta_path.exists():
        raise ValueError(f"{meta_path}: no heads to add a draft vocabulary to")
    model = engine.model
    heads = load_heads(out, model.config)
    meta = json.loads(meta_path.read_text())
    tc = meta.get("training", {}).get("config", {})
    holdout = float(tc.get("holdout_frac", a.holdout_frac))
    seed = int(tc.get("seed", a.seed))
    targets = tc.get("targets", a.targets)
    examples = list(src.examples)
    if src.prompts:
        cache_path = Path(a.generated) if a.generated else out / "answers.jsonl"
        have = set()
        if cache_path.exists():
            have = {json.loads(line)["key"] for line in cache_path.read_text(encoding="utf-8")
                    .splitlines() if line.strip()}
        missing = sum(_key(m) not in have for m in src.prompts)
        if missing:
            raise ValueError(f"{cache_path}: {missing} of {len(src.prompts)} prompts have no "
                             "cached answer; --draft-vocab-only generates nothing")
        answers, _ = generate_answers(engine, src.prompts, cache_path, a.generate_max_tokens)
        examples += answers
    examples = chunk_examples(examples, a.seq_len)
    hidden_path = Path(a.hidden_cache) if a.hidden_cache else out / "hidden_cache.pt"
    cache, _ = _hidden_cache(model, examples, hidden_path, say)
    train_seqs, hold_seqs = split_sequences(cache.num_seqs, holdout, seed)
    _, tgts = targets_for(cache, train_seqs, heads.num_heads, targets)
    ids, info = build_draft_vocab(cache, train_seqs, tgts, a.draft_vocab, model.config.vocab_size)
    if ids is None:
        raise ValueError(f"a draft vocabulary of {a.draft_vocab} covers the whole vocabulary")
    h_rows, h_tgts = targets_for(cache, hold_seqs, heads.num_heads, targets)
    if len(h_rows):
        full = evaluate(heads, model, cache, h_rows, h_tgts)
        info["heldout"] = evaluate(heads, model, cache, h_rows, h_tgts, vocab_ids=ids)
        info["heldout_full_vocab"] = {k: full[k] for k in ("positions", "top1", "top5")}
        _say_heldout(say, full, info["heldout"])
    info["command"] = _command()
    info["split"] = {"holdout_frac": holdout, "seed": seed, "targets": targets,
                     "train_sequences": len(train_seqs), "heldout_sequences": len(hold_seqs)}
    add_draft_vocab(out, model.config, ids, info)
    say(f"draft vocabulary: {info['size']} tokens ({info['added_by_targets']} added by head "
        f"targets), covers {info['answer_token_coverage']:.4f} of the training answer tokens")
    say(f"wrote {out / 'heads.json'} and {out / 'heads.safetensors'}")
    return 0
