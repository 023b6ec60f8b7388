"""Draft heads and their checkpoint layouts.

Implemented: Medusa residual-block heads (Medusa-1/2 layout, or the project's own format
with the base unembedding shared). Head k (from 1) reads the base model's final hidden
state at the last accepted token and guesses token t+1+k, t+1 being the verifier's own
bonus token, which is why candidates start at the second position of a step.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, SpecConfig

HEADS_FORMAT = "mtpserve-heads"
SHIPPED_HEADS_DIR = Path(__file__).parent / "heads"


class DraftHeads(Protocol):
    default_tree: str
    num_heads: int

    def candidates(self, hidden: torch.Tensor, model: nn.Module, last_tokens: list[int]
                   ) -> list[list[list[int]]]:
        """hidden: [B, H] at each sequence's last accepted token -> per sequence, per
        depth, the top-k candidate tokens (most likely first)."""
        ...


class ResBlock(nn.Module):
    """h + SiLU(W h + b): Medusa's block, initialised to identity by W = 0."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


class MedusaHeads(nn.Module):
    def __init__(self, hidden: int, vocab: int, num_heads: int, num_layers: int,
                 own_unembedding: bool = False, topk: int = 4, default_tree: str = "tree16") -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_layers = num_layers
        self.topk = topk
        self.default_tree = default_tree
        # Distinct modules per head: Medusa's `[ResBlock(h)] * n` shared weights by mistake.
        self.blocks = nn.ModuleList(
            nn.Sequential(*[ResBlock(hidden) for _ in range(num_layers)]) for _ in range(num_heads)
        )
        self.lm_heads = nn.ModuleList(nn.Linear(hidden, vocab, bias=False)
                                      for _ in range(num_heads)) if own_unembedding else None

    def head_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, H] -> [num_heads, B, H]."""
        return torch.stack([blk(hidden) for blk in self.blocks])

    def head_logits(self, hidden: torch.Tensor, model: nn.Module) -> torch.Tensor:
        """[B, H] -> [num_heads, B, V] float32."""
        hs = self.head_hidden(hidden)
        if self.lm_heads is None:
            nh, B, H = hs.shape
            return model.compute_logits(hs.reshape(nh * B, H)).view(nh, B, -1)
        return torch.stack([lm(h) for lm, h in zip(self.lm_heads, hs)]).float()

    def candidates(self, hidden: torch.Tensor, model: nn.Module, last_tokens: list[int]
                   ) -> list[list[list[int]]]:
        top = self.head_logits(hidden, model).topk(self.topk, dim=-1).indices  # [nh, B, k]
        per_head = top.transpose(0, 1).tolist()  # one host sync: [B][nh][k]
        return per_head


# -- loading ------------------------------------------------------------------------------
def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(str(path), map_location="cpu", weights_only=True)


def _assign(module: nn.Module, tensors: dict[str, torch.Tensor], where: Path) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    bad = [f"{k} has shape {list(tensors[k].shape)}, expected {list(own[k].shape)}"
           for k in own if k in tensors and tensors[k].shape != own[k].shape]
    if missing or unexpected or bad:
        parts = ([f"missing {missing[:4]}"] if missing else []) + \
                ([f"unexpected {unexpected[:4]}"] if unexpected else []) + bad[:4]
        raise ValueError(f"{where}: heads do not fit: {'; '.join(parts)}")
    module.load_state_dict(tensors)


def load_project_heads(folder: Path, base: ModelConfig) -> MedusaHeads:
    meta_path = folder / "heads.json"
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != HEADS_FORMAT:
        raise ValueError(f"{meta_path}: not an {HEADS_FORMAT} file")
    if meta.get("head_type") != "medusa":
        raise ValueError(f"{meta_path}: head type {meta.get('head_type')!r} is not supported")
    if meta.get("hidden_size") != base.hidden_size or meta.get("vocab_size") != base.vocab_size:
        raise ValueError(
            f"{meta_path}: heads were made for hidden {meta.get('hidden_size')} / vocab "
            f"{meta.get('vocab_size')}, the model has {base.hidden_size} / {base.vocab_size}")
    fp = meta.get("base_fingerprint")
    if fp and fp != base.fingerprint():
        raise ValueError(f"{meta_path}: heads belong to base model {fp}, "
                         f"this model is {base.fingerprint()}")
    heads = MedusaHeads(base.hidden_size, base.vocab_size, int(meta["num_heads"]),
                        int(meta["num_layers"]), bool(meta.get("own_unembedding", False)),
                        default_tree=meta.get("default_tree", "tree16"))
    _assign(heads, _read_tensors(folder / "heads.safetensors"), folder / "heads.safetensors")
    return heads


def load_medusa_heads(folder: Path, base: ModelConfig) -> MedusaHeads:
    """The Medusa authors' layout: config.json + medusa_lm_head.{safetensors,pt}."""
    cfg = json.loads((folder / "config.json").read_text())
    n, layers = int(cfg["medusa_num_heads"]), int(cfg.get("medusa_num_layers", 1))
    weights = next((folder / f for f in ("medusa_lm_head.safetensors", "medusa_lm_head.pt")
                    if (folder / f).exists()), None)
    if weights is None:
        raise ValueError(f"{folder}: medusa_lm_head.safetensors or .pt is missing")
    raw = _read_tensors(weights)
    own = any(k == f"0.{layers}.weight" for k in raw)
    heads = MedusaHeads(base.hidden_size, base.vocab_size, n, layers, own_unembedding=own)
    renamed: dict[str, torch.Tensor] = {}
    for k, v in raw.items():
        i, j, rest = k.split(".", 2)
        if int(j) == layers:
            renamed[f"lm_heads.{i}.{rest}"] = v
        else:
            renamed[f"blocks.{i}.{j}.{rest}"] = v
    _assign(heads, renamed, weights)
    return heads


def save_project_heads(heads: MedusaHeads, folder: str | Path, base: ModelConfig,
                       training: dict | None = None) -> None:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().contiguous().cpu() for k, v in heads.state_dict().items()},
              str(folder / "heads.safetensors"))
    meta = {
        "format": HEADS_FORMAT, "version": 1, "head_type": "medusa",
        "num_heads": heads.num_heads, "num_layers": heads.num_layers,
        "hidden_size": base.hidden_size, "vocab_size": base.vocab_size,
        "own_unembedding": heads.lm_heads is not None,
        "base_fingerprint": base.fingerprint(), "default_tree": heads.default_tree,
        "training": training or {},
    }
    (folder / "heads.json").write_text(json.dumps(meta, indent=2) + "\n")


def load_heads(path: str | Path, base: ModelConfig) -> MedusaHeads:
    folder = Path(path)
    if folder.is_file():
        folder = folder.parent
    if (folder / "heads.json").exists():
        return load_project_heads(folder, base)
    if (folder / "config.json").exists() and "medusa_num_heads" in (folder / "config.json").read_text():
        return load_medusa_heads(folder, base)
    raise ValueError(f"{path}: no draft heads found (expected heads.json or a Medusa config.json)")


def load_heads_for(spec: SpecConfig, base: ModelConfig, model_path: str, device: torch.device,
                   dtype: torch.dtype) -> MedusaHeads | None:
    """Heads named by --heads, else heads shipped for this exact base model, else none."""
    if spec.mode == "off" or spec.proposer == "ngram":
        return None
    path = spec.heads_path
    if path is None:
        shipped = SHIPPED_HEADS_DIR / base.fingerprint()
        if not (shipped / "heads.json").exists():
            return None
        path = str(shipped)
    if not os.path.exists(path):
        raise ValueError(f"{path}: heads path does not exist")
    heads = load_heads(path, base)
    return heads.to(device=device, dtype=dtype).eval()
