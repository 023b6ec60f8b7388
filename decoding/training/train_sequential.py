"""`mtpserve train-heads --head-type sequential`: a DeepSeek/EAGLE-style module that drafts
a chain, trained by self-distillation on the frozen trunk's cached hidden states.

Why: a Medusa head guesses token t+1+k from h_t alone; a sequential module also reads the
embedding of the token it has just drafted, so each depth conditions on the one before.

Training runs exactly what drafting runs: depth j = 1..D takes the previous depth's state
(the trunk's final-normed h_t at depth 1) and the embedding of x_{t+j} (at depth 1 the
verifier's bonus token) and is scored against x_{t+1+j} (the base model's greedy choice
with `--targets argmax`). Input tokens are teacher-forced: a draft at depth j counts only
when the depths before it were right, i.e. equal to these. One module serves every depth
(drafting reuses the last module), so a tree may be deeper than the depth trained.

Attention, `TrainConfig.attention`:
- chain (default): every depth attends over its own chain only (mtp_sequential.py
  `candidates()`). On the embedded model's data (~170k answer tokens) this generalised
  better than context: held-out top-1 .450/.386/.369 vs .394/.352/.336 from the identity
  start, and context fine-tuning from the chain weights lowered held-out accuracy while the
  training loss fell (docs/experiments.md).
- context (mtp_context.py, as EAGLE and DeepSeek train): depth 1 at position t
  attends over the module's depth-1 entries at every position <= t, i.e. one causal pass
  over whole sequences; depth j > 1 (chain step t + j - 1) attends over those same entries
  <= t and over its own chain's depths 2..j (a block diagonal per depth: the "training-time
  test" mask), so each depth sees exactly what it sees while drafting.

Training-time test (EAGLE-3 / HASS): depth j >= 2 reads the module's OWN state from depth
j-1, as drafting does, never the trunk's h_{t+j-1} (EAGLE-1 trains one step on the trunk's
features and drafts on its own); in context mode also the own-chain attention above.
`--chain-features trunk` feeds the trunk's features instead (chain mode), an ablation to
measure what training-time test is worth.

Targets, `--distill`: top1 (cross-entropy to the target token) or kl (KL to the frozen
trunk's softmax at that position, restricted to the training softmax vocabulary: soft
targets carry the trunk's second choices, which typical acceptance also accepts).
Chain inputs, `--chain-inputs`: with `--targets argmax` the chain reads the base's greedy
tokens; on sampled answers those are not the tokens the trunk's later choices followed,
so `data` feeds the data's own tokens (the same on greedy answers) while the targets stay
the base's choices; the held-out evaluation then feeds the same.

Start: the block is the trunk's last layer with its two output projections zeroed and
eh_proj passing the hidden state through (token part small and random), so the untrained
module drafts what h_t itself predicts, Medusa's identity start. On the embedded model's
round-2 data one epoch reached held-out depth-1 top-1 0.39 from this start, 0.22 from the
unchanged last layer over an evenly mixed [embedding, hidden] input (a one-off
prototype of this training in session 4, not kept).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..model.attention_metadata import AttentionMetadata, padded_layout
from ..model.linear import Linear
from ..spec.mtp_sequential import ChainKV, SequentialMTPHeads
from .hidden_cache import HiddenCache, split_sequences, targets_for
from .train_config import TrainConfig
from .train_loop import run_steps, top1_hits
from .vocab import build_draft_vocab, remap_targets, softmax_vocab


class DepthKV:
    """Training's stand-in for the module cache in context mode: whole padded sequences
    [B, T], one block of keys per depth, concatenated along the key axis (so the mask of
    depth j is [T, j*T]: causal over depth 1, the diagonal over depths 2..j)."""

    def __init__(self, B: int, T: int) -> None:
        self.B, self.T = B, T
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []

    def _padded(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        if meta.q_scatter is not None:  # packed rows -> [B*T] with zero padding
            x = x.new_zeros(self.B * self.T, *x.shape[1:]).index_copy(0, meta.q_scatter, x)
        return x.view(self.B, self.T, *x.shape[1:]).transpose(1, 2)  # [B, Hkv, T, D]

    def write(self, layer: int, meta: AttentionMetadata, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k.append(self._padded(k, meta))
        self.v.append(self._padded(v, meta))

    def keys(self, layer: int, meta: AttentionMetadata) -> torch.Tensor:
        return torch.cat(self.k, 2)

    def values(self, layer: int, meta: AttentionMetadata) -> torch.Tensor:
        return torch.cat(self.v, 2)


def context_logits(heads: SequentialMTPHeads, model: torch.nn.Module, cache: HiddenCache,
                   seqs: list[int], depth: int, mode: str, unembed: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every position of sequences `seqs`, context mode -> (global row index [N], float32
    logits [N, depth, V'] against unembed [V', H]). Depth 1 reads the data's real next
    token (the context's entries, as the engine writes them); deeper depths read the
    teacher-forced chain inputs."""
    spans = [(int(cache.seq_start[s]), int(cache.seq_start[s + 1])) for s in seqs]
    counts = [b - a for a, b in spans]
    B, T = len(spans), max(counts)
    rows = torch.cat([torch.arange(a, b) for a, b in spans])
    dev = cache.hidden.device
    q_gather, q_scatter = padded_layout(counts)
    pos = row_positions(cache)[rows]
    causal = torch.ones(T, T, dtype=torch.bool).tril_()
    eye = torch.eye(T, dtype=torch.bool)
    # Chain inputs within each sequence: depth 1 the data's next token, then teacher-forced.
    inputs = chain_inputs(cache, rows, depth, mode)
    inputs[:, 0] = cache.tokens[rows].clamp(min=0)
    kv, h, out = DepthKV(B, T), cache.hidden[rows], []
    last = len(heads.mods) - 1
    for j in range(depth):
        mask = torch.cat([causal] + [eye] * j, 1)[None, None]
        meta = AttentionMetadata(
            positions=pos + j, token_slots=rows, token_store=rows, seq_slots=torch.arange(B),
            slot_start=0, kv_len=(j + 1) * T, num_seqs=B, q_len=T,
            q_gather=q_gather, q_scatter=q_scatter, mask=mask)
        h, normed = heads.mods[min(j, last)].advance(inputs[:, j].to(dev), h, model, meta, kv)
        out.append(normed.float() @ unembed.T)
    return rows, torch.stack(out, 1)


@torch.no_grad()
def init_from_trunk(heads: SequentialMTPHeads, model: torch.nn.Module, seed: int) -> None:
    """Every module starts as the identity on h_t (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    last = dict(model.layers[-1].named_parameters())
    last.update({f"{name}.weight": m.dense_weight() for name, m in model.layers[-1].named_modules()
                 if isinstance(m, Linear)})  # CPU storage may hold them packed
    H = model.config.hidden_size
    for mod in heads.mods:
        for name, p in mod.block.named_parameters():
            p.copy_(last[name].detach().reshape(p.shape))
        mod.block.self_attn.o_proj.weight.zero_()
        mod.block.mlp.down_proj.weight.zero_()
        w = torch.zeros(H, 2 * H)
        w[:, :H] = torch.randn(H, H, generator=g) * 0.01  # [embedding | hidden]
        w[:, H:] = torch.eye(H)
        mod.eh_proj.weight.copy_(w)
        for norm in (mod.enorm, mod.hnorm, mod.norm):
            norm.weight.fill_(1.0)


def chain_inputs(cache: HiddenCache, rows: torch.Tensor, depth: int, mode: str) -> torch.Tensor:
    """[M, depth] tokens fed at each depth: x_{t+1..t+depth} (the base model's greedy
    tokens with mode argmax, the data's with tokens or data); 0 where the sequence has
    ended (those depths have no target)."""
    src = cache.argmax if mode == "argmax" else cache.tokens
    idx = (rows[:, None] + torch.arange(depth)[None]).clamp(max=len(src) - 1)
    return src[idx].clamp(min=0)


def row_positions(cache: HiddenCache) -> torch.Tensor:
    """Each cached row's position inside its sequence (rope positions of the chain)."""
    lengths = cache.seq_start[1:] - cache.seq_start[:-1]
    starts = torch.repeat_interleave(cache.seq_start[:-1], lengths)
    return torch.arange(int(cache.seq_start[-1])) - starts


def chain_logits(heads: SequentialMTPHeads, model: torch.nn.Module, h0: torch.Tensor,
                 tokens: torch.Tensor, pos0: torch.Tensor, unembed: torch.Tensor,
                 feats: torch.Tensor | None = None) -> torch.Tensor:
    """h0 [B, H], tokens [B, D], pos0 [B] -> float32 logits [B, D, V'] against unembed [V', H],
    through MTPModule.advance as drafting runs it (module j, or the last one, at depth j):
    depth j >= 2 reads the state depth j-1 produced (training-time test). `feats` [B, D, H]:
    depth j reads feats[:, j] instead (the trunk's features, `--chain-features trunk`)."""
    B, D = tokens.shape
    rows = torch.arange(B, device=h0.device)
    kv, h, out = ChainKV(), h0, []
    last = len(heads.mods) - 1
    for j in range(D):
        if feats is not None and j > 0:
            h = feats[:, j]
        mod = heads.mods[min(j, last)]
        steps = j - min(j, last) + 1  # this module's steps in the chain so far
        meta = AttentionMetadata(
            positions=pos0 + j, token_slots=rows, token_store=rows, seq_slots=rows,
            slot_start=0, kv_len=steps, num_seqs=B, q_len=1, q_gather=rows, q_scatter=rows,
            mask=None)
        h, normed = mod.advance(tokens[:, j], h, model, meta, kv)
        out.append(normed.float() @ unembed.T)
    return torch.stack(out, 1)


def trunk_features(cache: HiddenCache, rows: torch.Tensor, depth: int) -> torch.Tensor:
    """[M, depth, H]: the trunk's h_{t+j} for j = 0..depth-1 (what EAGLE-1-style training
    feeds depth j+1; clamped at the end of the cache, where no target counts)."""
    idx = (rows[:, None] + torch.arange(depth)[None]).clamp(max=len(cache.hidden) - 1)
    return cache.hidden[idx]


def teacher_probs(cache: HiddenCache, rows: torch.Tensor, depth: int,
                  unembed: torch.Tensor) -> torch.Tensor:
    """[M, depth, V']: the frozen trunk's softmax at positions t+1..t+depth (depth j's
    target distribution: what the verifier samples or takes the argmax of there), over the
    rows of `unembed` (renormalised when that is a subset of the vocabulary)."""
    idx = (rows[:, None] + 1 + torch.arange(depth)[None]).clamp(max=len(cache.hidden) - 1)
    return torch.softmax(cache.hidden[idx].float() @ unembed.T, -1)


def _logit_batches(heads: SequentialMTPHeads, model, cache: HiddenCache, rows: torch.Tensor,
                   tgts: torch.Tensor, mode: str, unembed: torch.Tensor, batch: int):
    """(logits [b, D, V'], targets [b, D]) for `rows` in batches, as the heads draft."""
    D = tgts.shape[1]
    if not heads.context:
        pos = row_positions(cache)
        for s in range(0, len(rows), batch):
            r = rows[s:s + batch]
            yield (chain_logits(heads, model, cache.hidden[r], chain_inputs(cache, r, D, mode),
                                pos[r], unembed), tgts[s:s + batch])
        return
    where = torch.full((len(cache.tokens),), -1, dtype=torch.long)
    where[rows] = torch.arange(len(rows))
    seqs = torch.unique(torch.searchsorted(cache.seq_start, rows, right=True) - 1).tolist()
    per = max(1, batch // 256)  # whole sequences: ~256 positions each
    for s in range(0, len(seqs), per):
        all_rows, lg = context_logits(heads, model, cache, seqs[s:s + per], D, mode, unembed)
        sel = where[all_rows] >= 0
        yield lg[sel], tgts[where[all_rows[sel]]]


@torch.no_grad()
def evaluate_chain(heads: SequentialMTPHeads, model, cache: HiddenCache, rows: torch.Tensor,
                   tgts: torch.Tensor, mode: str, vocab_ids: torch.Tensor | None = None,
                   max_rank: int = 10, batch: int = 256) -> dict:
    """Per depth, the hit rate of ranks 0..max_rank-1 with the earlier depths fed the right
    tokens (so `rank_acc[d][r]` is P(rank r right at depth d | depths < d right), what a
    tree that branches off the top-1 chain needs), over the full vocabulary or the draft
    vocabulary `vocab_ids`; `chain_accepted`: mean drafts accepted per step by the top-1
    chain of each length."""
    D = tgts.shape[1]
    unembed = model.unembed_weight().detach().float().cpu()
    if vocab_ids is not None:
        unembed = unembed[vocab_ids.cpu()]
    hits, count = torch.zeros(D, max_rank), torch.zeros(D)
    chain, inside = torch.zeros(D), torch.zeros(D)
    member = None
    if vocab_ids is not None:
        member = torch.zeros(model.config.vocab_size, dtype=torch.bool)
        member[vocab_ids.cpu()] = True
    heads.eval()
    for lg, tg in _logit_batches(heads, model, cache, rows, tgts, mode, unembed, batch):
        top = lg.topk(min(max_rank, lg.shape[-1]), -1).indices  # [B, D, R']
        if vocab_ids is not None:
            top = vocab_ids.cpu()[top]
        ok = tg >= 0
        eq = (top == tg[..., None]) & ok[..., None]
        hits[:, :top.shape[-1]] += eq.sum(0).float()
        count += ok.sum(0).float()
        chain += torch.cumprod(eq[..., 0].float(), 1).sum(0)
        if member is not None:
            inside += (member[tg.clamp(min=0)] & ok).sum(0).float()
    rank_acc = hits / count.clamp(min=1)[:, None]
    extra = {} if member is None else {
        "vocab": len(vocab_ids), "in_vocab": [round(float(x), 4) for x in inside / count.clamp(min=1)]}
    return extra | {"positions": int(count[0]), "top1": [round(float(a[0]), 4) for a in rank_acc],
            "top5": [round(float(a[:5].sum()), 4) for a in rank_acc],
            "rank_acc": [[round(float(x), 4) for x in a] for a in rank_acc],
            "chain_accepted": [round(float(x), 4) for x in
                               torch.cumsum(chain / max(1, len(rows)), 0)]}


def train_sequential(model, cache: HiddenCache, cfg: TrainConfig, out: Path,
                     resume: bool = False, progress=None, draft_vocab: int = 0,
                     init: SequentialMTPHeads | None = None
                     ) -> tuple[SequentialMTPHeads, dict]:
    """One module trained over `cfg.num_heads` chain depths. With `draft_vocab` the softmax
    runs over that vocabulary (what drafting scores), else over `cfg.vocab`'s choice.
    `init`: start from these module weights instead of the identity start."""
    torch.manual_seed(cfg.seed)
    model.requires_grad_(False)  # the trunk is frozen: no gradients into its embedding
    V = model.config.vocab_size
    D = cfg.num_heads
    heads = SequentialMTPHeads.new(model.config, num_modules=1,
                                   context=cfg.attention == "context")
    if init is None:
        init_from_trunk(heads, model, cfg.seed)
    else:
        heads.load_state_dict(init.state_dict())
    for p in heads.parameters():
        p.requires_grad_(True)
    train_seqs, hold_seqs = split_sequences(cache.num_seqs, cfg.holdout_frac, cfg.seed)
    rows, tgts = targets_for(cache, train_seqs, D, cfg.targets)
    h_rows, h_tgts = targets_for(cache, hold_seqs, D, cfg.targets)
    if len(rows) == 0:
        raise ValueError("no trainable positions: the data is empty or too short")
    ids, dv_info = (build_draft_vocab(cache, train_seqs, tgts, draft_vocab, V) if draft_vocab
                    else (None, None))
    unembed = model.unembed_weight().detach().float().cpu()
    vocab_ids = ids if ids is not None else (
        softmax_vocab(cfg, unembed, cache.hidden[rows], tgts) if cfg.vocab != "full" else None)
    sub_tgts = tgts if vocab_ids is None else remap_targets(tgts, vocab_ids, V)
    if vocab_ids is not None:
        unembed = unembed[vocab_ids]
    in_mode = cfg.targets if cfg.chain_inputs == "targets" else "tokens"
    inputs = chain_inputs(cache, rows, D, in_mode)
    pos = row_positions(cache)[rows]
    weights = torch.tensor([0.8 ** j for j in range(D)])  # deeper depths matter less
    resuming = resume and (out / "checkpoint.pt").exists()
    baseline = (evaluate_chain(heads, model, cache, h_rows, h_tgts, in_mode)
                if len(h_rows) and not resuming else None)

    def losses_of(logits: torch.Tensor, tg: torch.Tensor, at: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Weighted loss over depths of `logits` [B, D, V'] at cache rows `at` [B]."""
        if cfg.distill == "kl":
            p = teacher_probs(cache, at, D, unembed)
            kl = F.kl_div(F.log_softmax(logits, -1), p, reduction="none").sum(-1)  # [B, D]
            ok = (tg >= 0).float()
            losses = (kl * ok).sum(0) / ok.sum(0).clamp(min=1)
        else:
            losses = torch.stack([F.cross_entropy(logits[:, j], tg[:, j], ignore_index=-1)
                                  for j in range(D)])
        return (weights * losses).sum(), top1_hits(logits.transpose(0, 1), tg.T)

    def batch_loss(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = rows[idx]
        feats = trunk_features(cache, r, D) if cfg.chain_features == "trunk" else None
        logits = chain_logits(heads, model, cache.hidden[r], inputs[idx], pos[idx],
                              unembed, feats)  # [B, D, V']
        return losses_of(logits, sub_tgts[idx], r)

    def sequence_loss(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        all_rows, logits = context_logits(heads, model, cache, [train_seqs[i] for i in idx.tolist()],
                                          D, in_mode, unembed)
        return losses_of(logits, full[all_rows], all_rows)

    if heads.context:
        # Whole sequences: targets of every cached position (-1 where none), and about
        # batch_tokens trained positions per step.
        full = torch.full((len(cache.tokens), D), -1, dtype=torch.long)
        full[rows] = sub_tgts
        per_seq = len(rows) / max(1, len(train_seqs))
        report = run_steps(heads, len(train_seqs), cfg, out, resume, sequence_loss, progress,
                           batch_size=max(1, round(cfg.batch_tokens / per_seq)))
    else:
        report = run_steps(heads, len(rows), cfg, out, resume, batch_loss, progress)
    heads.eval()
    for p in heads.parameters():
        p.requires_grad_(False)
    report.update({
        "train_positions": len(rows), "train_sequences": len(train_seqs),
        "heldout_sequences": len(hold_seqs),
        "softmax_vocab": len(vocab_ids) if vocab_ids is not None else V,
    })
    if len(h_rows):
        report["heldout"] = evaluate_chain(heads, model, cache, h_rows, h_tgts, in_mode)
        if baseline is not None:
            start = "heldout_untrained_identity_heads" if init is None else "heldout_init_heads"
            report[start] = {k: baseline[k] for k in ("top1", "top5")}
    if ids is not None:
        heads.set_draft_vocab(ids)
        if len(h_rows):
            dv_info["heldout"] = evaluate_chain(heads, model, cache, h_rows, h_tgts, in_mode,
                                                vocab_ids=ids)
    if dv_info is not None:
        report["draft_vocab"] = dv_info
    return heads, report
