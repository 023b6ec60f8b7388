"""The optimisation loop the frozen-trunk head types share (Medusa and sequential): AdamW
with linear warmup and cosine decay, shuffled epochs, checkpoints and resume.

Why a module of its own: both head types differ only in the loss of a batch, which they
pass in; the joint mode reuses the learning-rate schedule.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from .progress import ProgressBar
from .train_config import TrainConfig

log = logging.getLogger(__name__)


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Learning rate at `step` of `total`: linear warmup over cfg.warmup_steps, then
    cosine decay to 0."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


@torch.no_grad()
def top1_hits(logits: torch.Tensor, tg: torch.Tensor) -> torch.Tensor:
    """logits [K, B, V'], targets [K, B] (-1: none) -> top-1 accuracy per head [K]."""
    ok = tg >= 0
    return ((logits.argmax(-1) == tg) & ok).sum(1).float() / ok.sum(1).clamp(min=1)


def run_steps(module: torch.nn.Module, num_rows: int, cfg: TrainConfig, out: Path,
              resume: bool,
              batch_loss: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
              progress: Callable[[str], None] | None = None,
              batch_size: int | None = None) -> dict:
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

    bar = ProgressBar(total, step)
    t0 = time.perf_counter()
    ema_loss, ema_acc = None, None
    module.train()
    while step < total:
        epoch, within = divmod(step, steps_per_epoch)
        perm = torch.randperm(num_rows, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        idx = perm[within * per_step:(within + 1) * per_step]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, cfg)
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
