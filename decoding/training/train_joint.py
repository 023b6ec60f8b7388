"""`mtpserve train-heads --joint`: Medusa heads and the trunk trained together (Medusa-2
style), with the forward curriculum of Aynetdinov & Akbik (2025, "Pre-Training Curriculum
for Multi-Token Prediction in Language Models").

Why: heads on a frozen trunk can only read what h_t already says about later tokens;
letting the trunk's last layers move lets h_t carry more of the future. The price is a
different model: the heads belong to the fine-tuned trunk (written to OUT/model), and the
report says how far its greedy choices moved from the original's.

Each step runs the trunk forward and backward over a batch of whole sequences (no hidden
cache: the trunk changes) and minimises
    CE(trunk logits at t, x_{t+1}) + sum_k w_k(step) * CE(head k logits at t, x_{t+1+k})
on the data's tokens (on the default recipe the base model's own greedy answers, so these
are self-distillation targets). w_k is the forward curriculum: next-token prediction
first, head k switching on before head k+1, all heads on at the end of a ramp
(`curriculum_weights`). Heads share the trunk's frozen unembedding, as on the frozen path.
Loading, unfreezing, running and exporting the trainable trunk: joint_trunk.py.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ..model.trunk import CausalLM
from ..spec.heads import MedusaHeads
from ..spec.heads_io import save_project_heads
from .heads_data import Example
from .hidden_cache import HiddenCache, cache_hidden, data_key, split_sequences, targets_for
from .joint_trunk import export_trunk, load_trainable, set_trainable, trunk_hidden
from .progress import ProgressBar, say_heldout
from .train_config import TrainConfig, command_line
from .train_loop import lr_at
from .train_medusa import evaluate
from .tree_choice import choose_tree
from .vocab import build_draft_vocab, remap_targets


@dataclass(slots=True)
class JointConfig:
    curriculum: str = "forward"  # forward | none (every head weight 1 from step 0)
    ramp_frac: float = 0.5  # share of the steps over which the heads switch on
    trunk_lr: float = 1e-5  # the heads keep TrainConfig.lr
    trunk_layers: int | None = None  # the last N decoder layers (+ final norm); None: all
    max_steps: int = 0  # stop after this many steps, the schedule laid out for them; 0: none

    def __post_init__(self) -> None:
        if self.curriculum not in ("forward", "none"):
            raise ValueError("curriculum must be forward or none")
        if not 0.0 <= self.ramp_frac <= 1.0:
            raise ValueError("curriculum ramp must be in [0, 1]")
        if self.trunk_lr <= 0:
            raise ValueError("trunk_lr must be > 0")
        if self.trunk_layers is not None and self.trunk_layers < 1:
            raise ValueError("trunk_layers must be >= 1")
        if self.max_steps < 0:
            raise ValueError("max_steps must be >= 0")

    def weights(self, step: int, total: int, num_heads: int) -> list[float]:
        ramp = self.ramp_frac if self.curriculum == "forward" else 0.0
        return curriculum_weights(step, total, num_heads, ramp)


def curriculum_weights(step: int, total_steps: int, num_heads: int, ramp_frac: float
                       ) -> list[float]:
    """Loss weight of each head at `step`: the forward curriculum as K equal stages over
    the first `ramp_frac` of the steps (stage 0 next-token only, stage j heads 1..j), every
    head on from the end of the ramp. ramp_frac 0: all on from step 0; K/(K+1): the paper's
    schedule (one more predicted token every n/(K+1) steps of n)."""
    ramp = ramp_frac * total_steps
    return [1.0 if step >= k * ramp / num_heads else 0.0 for k in range(1, num_heads + 1)]


# -- one step's loss -----------------------------------------------------------------------
def sequence_targets(ex: Example, num_heads: int) -> torch.Tensor:
    """[n, 1 + K]: column j holds x_{t+1+j} for position t (column 0 the trunk's next
    token, column k head k's), -1 before train_from or past the end."""
    ids = torch.tensor(ex.ids + [-1] * (num_heads + 1), dtype=torch.long)
    idx = torch.arange(len(ex.ids))[:, None] + torch.arange(1, num_heads + 2)[None]
    tg = ids[idx]
    tg[:ex.train_from] = -1
    return tg


def _ce(logits: torch.Tensor, tg: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the positions with a target (0, not NaN, when none)."""
    return (F.cross_entropy(logits.float(), tg, ignore_index=-1, reduction="sum")
            / (tg >= 0).sum().clamp(min=1))


def joint_loss(model: CausalLM, heads: MedusaHeads, batch: list[Example], weights: list[float],
               cfg: TrainConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Next-token CE of the trunk plus the curriculum-weighted CE of each head switched on
    (heads at weight 0 are not run). The heads' softmax follows `cfg.vocab` as on the
    frozen path, with the current trunk's top-k standing in for the base model's."""
    h = trunk_hidden(model, [e.ids for e in batch])  # [T, H]
    tg = torch.cat([sequence_targets(e, heads.num_heads) for e in batch])  # [T, 1+K] cpu
    unembed = model.unembed_weight()
    logits = F.linear(h, unembed)  # [T, V]
    ntp = _ce(logits, tg[:, 0].to(h.device))
    total, parts = ntp, {"ntp": ntp.item()}
    active = [k for k, w in enumerate(weights) if w > 0]
    if not active:
        return total, parts
    head_tg = tg[:, 1:]
    w = unembed
    if cfg.vocab != "full":
        keep = [head_tg[head_tg >= 0]]
        if cfg.vocab == "plausible":
            keep.append(logits.detach().topk(cfg.plausible_topk, -1).indices.flatten().cpu())
        cols = torch.unique(torch.cat(keep))
        head_tg = remap_targets(head_tg, cols, model.config.vocab_size)
        w = unembed[cols.to(h.device)]
    head_tg = head_tg.to(h.device)
    for k in active:
        ce = _ce(heads.blocks[k](h) @ w.T, head_tg[:, k])
        total = total + weights[k] * ce
        parts[f"h{k + 1}"] = ce.item()
    return total, parts


# -- training ------------------------------------------------------------------------------
def plan_batches(lengths: list[int], batch_tokens: int, epochs: int, seed: int
                 ) -> list[tuple[int, list[int]]]:
    """(epoch, sequence indices) per step: each epoch's shuffled order packed greedily into
    batches of at most `batch_tokens` positions (a longer sequence goes alone).
    Deterministic, so a resumed run replays the same plan."""
    plan = []
    for epoch in range(epochs):
        g = torch.Generator().manual_seed(seed * 1000 + epoch)
        cur, used = [], 0
        for i in torch.randperm(len(lengths), generator=g).tolist():
            if cur and used + lengths[i] > batch_tokens:
                plan.append((epoch, cur))
                cur, used = [], 0
            cur.append(i)
            used += lengths[i]
        if cur:
            plan.append((epoch, cur))
    return plan


def _token_cache(examples: list[Example]) -> HiddenCache:
    """Tokens only (no hidden states, no argmax): what targets_for(..., "tokens") and
    build_draft_vocab read."""
    tokens = torch.cat([torch.tensor(e.ids[1:] + [-1], dtype=torch.long) for e in examples])
    starts = torch.tensor([0] + [len(e.ids) for e in examples]).cumsum(0)
    return HiddenCache(torch.zeros(0, 0), torch.zeros(0, dtype=torch.long), tokens, starts,
                       torch.tensor([e.train_from for e in examples]))


def _trained_span(cache: HiddenCache, s: int) -> slice:
    return slice(int(cache.seq_start[s] + cache.train_from[s]), int(cache.seq_start[s + 1]) - 1)


def trunk_drift(before: HiddenCache, after: HiddenCache) -> dict:
    """At every held-out position with a next token: how often the fine-tuned trunk's
    greedy choice equals the original model's, and each one's agreement with the data."""
    same = orig = tuned = n = 0
    for s in range(before.num_seqs):
        sl = _trained_span(before, s)
        a, b, x = before.argmax[sl], after.argmax[sl], before.tokens[sl]
        same += int((a == b).sum())
        orig += int((a == x).sum())
        tuned += int((b == x).sum())
        n += len(x)
    r = lambda c: round(c / max(1, n), 4)  # noqa: E731
    return {"positions": n, "next_token_agreement_with_original": r(same),
            "original_top1_vs_data": r(orig), "fine_tuned_top1_vs_data": r(tuned)}


def train_joint(model: CausalLM, examples: list[Example], cfg: TrainConfig, jcfg: JointConfig,
                out: Path, resume: bool = False, progress=None, draft_vocab: int = 0
                ) -> tuple[MedusaHeads, dict]:
    """Fine-tune `model` (dense fp32, changed in place) together with new Medusa heads;
    checkpoint to out/checkpoint.pt. Returns the heads (on the CPU) and the report."""
    torch.manual_seed(cfg.seed)
    say = progress or (lambda m: None)
    dev = model.embed_tokens.weight.device
    K, V = cfg.num_heads, model.config.vocab_size
    trunk = set_trainable(model, jcfg.trunk_layers)
    heads = MedusaHeads(model.config.hidden_size, V, K, cfg.num_layers).to(dev)
    train_idx, hold_idx = split_sequences(len(examples), cfg.holdout_frac, cfg.seed)
    train_ex, hold_ex = [examples[i] for i in train_idx], [examples[i] for i in hold_idx]
    if not any(len(e.ids) - 1 > e.train_from for e in train_ex):
        raise ValueError("no trainable positions: the data is empty or too short")
    # The original model's held-out hidden states and greedy choices, before any step.
    before = cache_hidden(model, hold_ex) if hold_ex else None
    plan = plan_batches([len(e.ids) for e in train_ex], cfg.batch_tokens, cfg.epochs, cfg.seed)
    total = min(len(plan), jcfg.max_steps) if jcfg.max_steps else len(plan)
    opt = torch.optim.AdamW([
        {"params": list(heads.parameters()), "lr": cfg.lr, "base_lr": cfg.lr},
        # No decay on the trunk: AdamW's decay pulls pretrained weights toward zero.
        {"params": trunk, "lr": jcfg.trunk_lr, "base_lr": jcfg.trunk_lr, "weight_decay": 0.0},
    ], weight_decay=cfg.weight_decay)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    key = {"config": asdict(cfg), "joint": asdict(jcfg), "data": data_key(train_ex)}
    ckpt, step = out / "checkpoint.pt", 0
    if resume and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        if {k: state.get(k) for k in key} != key:
            raise ValueError(f"{ckpt}: was written with other settings or data (joint "
                             f"{state.get('joint')}, config {state.get('config')})")
        heads.load_state_dict(state["heads"])
        with torch.no_grad():
            for n, p in zip(names, trunk):
                p.copy_(state["trunk"][n])
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
        say(f"resumed from {ckpt} at step {step}/{total}")

    def save_ckpt() -> None:
        out.mkdir(parents=True, exist_ok=True)
        tmp = ckpt.with_suffix(".tmp")
        torch.save({**key, "heads": heads.state_dict(), "step": step, "optimizer": opt.state_dict(),
                    "trunk": {n: p.detach().cpu() for n, p in zip(names, trunk)}}, tmp)
        tmp.replace(ckpt)

    bar, ema, t0, first = ProgressBar(total, step), {}, time.perf_counter(), step
    model.train()
    heads.train()
    while step < total:
        epoch, idx = plan[step]
        scale = lr_at(step, total, cfg) / cfg.lr  # warmup + cosine, in proportion per group
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * scale
        loss, parts = joint_loss(model, heads, [train_ex[i] for i in idx],
                                 jcfg.weights(step, total, K), cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        for name, v in {"loss": loss.item(), **parts}.items():
            ema[name] = v if name not in ema else 0.9 * ema[name] + 0.1 * v
        bar.update(step, f"epoch {epoch + 1}/{cfg.epochs} " + " ".join(
            f"{n} {ema[n]:.3f}" for n in ["loss", *parts]))
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total:
            save_ckpt()
    bar.close()
    save_ckpt()
    seconds = time.perf_counter() - t0
    model.eval()
    model.requires_grad_(False)
    heads = heads.cpu().eval().requires_grad_(False)
    ramp = jcfg.ramp_frac if jcfg.curriculum == "forward" else 0.0
    report: dict = {
        "steps": total, "planned_steps_all_epochs": len(plan),
        "train_seconds_this_run": round(seconds, 1),
        "seconds_per_step": round(seconds / max(1, step - first), 3),
        "final_train_loss_ema": {n: round(v, 4) for n, v in ema.items()},
        "curriculum_switch_on_steps": [next(s for s in range(total + 1)
                                            if curriculum_weights(s, total, K, ramp)[k] > 0)
                                       for k in range(K)],
        "trunk_parameters_trained": sum(p.numel() for p in trunk),
        "train_sequences": len(train_ex), "heldout_sequences": len(hold_ex),
        "train_positions": sum(max(0, len(e.ids) - 1 - e.train_from) for e in train_ex),
    }
    if before is not None:
        after = cache_hidden(model, hold_ex)
        seqs = list(range(len(hold_ex)))
        # What acceptance measures once served: the fine-tuned trunk's own greedy choices.
        rows, tgts = targets_for(after, seqs, K, "argmax")
        report["heldout"] = evaluate(heads, model, after, rows, tgts)
        d_rows, d_tgts = targets_for(after, seqs, K, "tokens")
        report["heldout_data_tokens"] = {k: v for k, v in evaluate(
            heads, model, after, d_rows, d_tgts).items() if k in ("positions", "top1", "top5")}
        o_rows, o_tgts = targets_for(before, seqs, K, "argmax")
        report["heldout_untrained_identity_heads_original_trunk"] = {k: v for k, v in evaluate(
            MedusaHeads(model.config.hidden_size, V, K, cfg.num_layers), model, before, o_rows,
            o_tgts).items() if k in ("top1", "top5")}
        report["trunk_drift"] = trunk_drift(before, after)
    if draft_vocab:
        tokens = _token_cache(examples)
        _, tr_tgts = targets_for(tokens, train_idx, K, "tokens")
        ids, info = build_draft_vocab(tokens, train_idx, tr_tgts, draft_vocab, V)
        if ids is not None:
            heads.set_draft_vocab(ids)
            if before is not None:
                info["heldout"] = evaluate(heads, model, after, rows, tgts, vocab_ids=ids)
        report["draft_vocab"] = info
    return heads, report


# -- command line (flags in train_config.add_train_args) ----------------------------------
def check_joint_args(a: argparse.Namespace) -> None:
    """Refuse what joint training does not do, before any model loads."""
    if not a.joint:
        if a.max_steps:
            raise ValueError("--max-steps is for --joint (frozen-trunk training runs whole epochs)")
        return
    if a.head_type != "medusa":
        raise ValueError("--joint trains Medusa heads with the trunk; --head-type sequential "
                         "is not supported with --joint (train sequential modules on the frozen "
                         "trunk, or Medusa heads jointly)")
    for flag, given in (("--draft-vocab-only", a.draft_vocab_only), ("--init-heads", a.init_heads),
                        ("--hidden-cache", a.hidden_cache)):
        if given:
            raise ValueError(f"{flag} does not go with --joint (the trunk changes every step: "
                             "no hidden-state cache, no heads to reuse)")


def run_joint(a: argparse.Namespace, cfg: TrainConfig, engine, examples: list[Example],
              recipe: dict, out: Path, say, t_all: float) -> int:
    """`train-heads --joint` after the data is read (and answered): train, export the
    trunk to OUT/model, save the heads, report."""
    cfg = replace(cfg, targets="tokens")  # joint training learns the data's tokens
    jcfg = JointConfig(curriculum=a.curriculum, ramp_frac=a.curriculum_ramp,
                       trunk_lr=a.trunk_lr, trunk_layers=a.trunk_layers, max_steps=a.max_steps)
    recipe.update(sequences=len(examples), positions=sum(len(e.ids) for e in examples))
    model, ck = load_trainable(a.model, next(engine.model.parameters()).device)
    heads, report = train_joint(model, examples, cfg, jcfg, out, resume=a.resume, progress=say,
                                draft_vocab=a.draft_vocab)
    tree_info: dict = {}
    if "heldout" in report:
        ranks = report.get("draft_vocab", {}).get("heldout", report["heldout"])["rank_acc"]
        heads.default_tree, tree_info = choose_tree(ranks, out, topk=heads.topk)
    model_dir = export_trunk(model, ck, out / "model")
    note = (f"these heads belong to the fine-tuned trunk in {model_dir}, not to "
            f"{engine.model_name}: their base fingerprint is config-based and cannot tell the "
            f"two apart; serve them as `--model {model_dir} --heads {out}`")
    training = {
        "command": command_line(),
        "method": "joint (medusa-2 style): heads and the trunk's last layers trained together "
                  "on the data's tokens, next-token loss plus curriculum-weighted head losses; "
                  "shared frozen unembedding",
        "joint": True, "curriculum": {"kind": jcfg.curriculum, "ramp_frac": jcfg.ramp_frac},
        "trunk_lr": jcfg.trunk_lr,
        "trunk_layers": jcfg.trunk_layers or model.config.num_layers,
        "base_model": engine.model_name, "fine_tuned_model": str(model_dir), "note": note,
        "config": asdict(cfg), "joint_config": asdict(jcfg), "data": recipe,
        "total_seconds_this_run": round(time.perf_counter() - t_all, 1),
        "torch": torch.__version__, "tree": tree_info, **report,
    }
    save_project_heads(heads, out, model.config, training=training)
    if "heldout" in report:
        say("held-out, against the fine-tuned trunk's own greedy choices:")
        say_heldout(say, report["heldout"], report.get("draft_vocab", {}).get("heldout"))
        d = report["trunk_drift"]
        say(f"trunk moved: its greedy next token equals the original model's at "
            f"{d['next_token_agreement_with_original']:.3f} of {d['positions']} held-out "
            f"positions (top-1 vs the data: original {d['original_top1_vs_data']:.3f}, "
            f"fine-tuned {d['fine_tuned_top1_vs_data']:.3f})")
        say(f"default tree: {heads.default_tree}")
    say(f"{report['steps']} steps, {report['seconds_per_step']} s/step")
    say(f"wrote {out / 'heads.json'}, {out / 'heads.safetensors'} and the fine-tuned model "
        f"{model_dir}")
    say(f"note: {note}")
    return 0
