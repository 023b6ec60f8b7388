"""The draft heads interface (`DraftHeads`) and Medusa residual-block heads with the
Medusa authors' checkpoint layout. Reading and writing heads folders, detecting which
layout is on disk (`load_heads`), lives in heads_io.py, which imports every layout;
no layout imports it. The head types:

- Medusa residual-block heads (here): the Medusa authors' layout (config.json with
  `medusa_num_heads` + medusa_lm_head.*, read here) or the project's own format
  (heads.json, heads_io.py), with the base unembedding shared or their own. Head k (from 1)
  reads the base model's final hidden state at the last accepted token and guesses token
  t+1+k, t+1 being the verifier's own bonus token, which is why candidates start at the
  second position of a step.
- Meta-style parallel MTP (mtp_parallel.py): params.json with `n_future_tokens`; the extra
  transformer blocks branch off the residual stream entering the last layer and run in
  the verify forward itself, with their own KV-cache layers.
- Sequential MTP modules, DeepSeek-V3 / MiMo (mtp_sequential.py): config.json with
  `num_nextn_predict_layers`; chained drafts, one module per depth (the last one reused).

Draft vocabulary (FR-Spec style, optional; the shared pieces are in draft_vocab.py): the
project format may store a sorted int64 tensor `draft_vocab` of token ids in
heads.safetensors (its length is `draft_vocab_size` in heads.json). Heads then score only
those rows of the unembedding (sliced once per model/device/dtype and cached, not per
step) and their top-k are mapped back to token ids, so drafting costs
num_heads x |draft_vocab| instead of num_heads x V per row. Without it (older folders,
the Medusa authors' layout) heads score the full vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .draft_vocab import UnembedRows, check_draft_vocab
from .mtp_common import assign_state, read_tensors


class DraftHeads(Protocol):
    default_tree: str
    num_heads: int

    def candidates(self, hidden: torch.Tensor, model: nn.Module, last_tokens: list[int],
                   num_heads: int | None = None, positions: list[int] | None = None
                   ) -> list[list[list[int]]]:
        """hidden: [B, H] at each sequence's last accepted token (heads that branch off
        the trunk get their own rows instead, see mtp_parallel.py), last_tokens: each
        sequence's newest token (the bonus), positions: the last accepted token's
        position -> per sequence, per depth (the first num_heads depths; default all),
        the top-k candidate tokens (most likely first)."""
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
        self.vocab_size = vocab
        # Sorted token ids the heads draft from (None: the full vocabulary). A buffer so
        # `.to(device)` moves it, but not persistent: it is not a weight (saved separately).
        self.register_buffer("draft_vocab", None, persistent=False)
        self._shared_rows = UnembedRows()  # draft-vocabulary rows of the base unembedding
        self._sub_unembed: torch.Tensor | None = None  # the same for heads' own unembeddings
        self._sub_key: tuple | None = None

    def set_draft_vocab(self, ids: torch.Tensor | None, where: str = "draft_vocab") -> None:
        """Restrict drafting to `ids` (1-D, strictly increasing, within the vocabulary);
        None restores the full vocabulary."""
        self._sub_unembed, self._sub_key = None, None
        self._shared_rows = UnembedRows()
        if ids is None:
            self.draft_vocab = None
            return
        ids = check_draft_vocab(ids, self.vocab_size, where)
        dev = next(self.parameters()).device
        self.draft_vocab = ids.to(dev)

    def _draft_unembedding(self, model: nn.Module | None) -> torch.Tensor:
        """Rows `draft_vocab` of the unembedding in use ([V', H], or [nh, V', H] for heads
        with their own), built on the first call and kept while the source weight, device
        and dtype stay the same."""
        if self.lm_heads is None:
            return self._shared_rows.get(model.unembed_weight(), self.draft_vocab)
        w0 = self.lm_heads[0].weight
        key = (tuple(lm.weight.data_ptr() for lm in self.lm_heads), w0.device, w0.dtype,
               self.draft_vocab.data_ptr(), self.draft_vocab.device)
        if self._sub_key != key:
            with torch.no_grad():
                dv = self.draft_vocab.to(w0.device)
                rows = [lm.weight.detach().index_select(0, dv) for lm in self.lm_heads]
                self._sub_unembed = torch.stack(rows).contiguous()
            self._sub_key = key
        return self._sub_unembed

    def prepare(self, model: nn.Module | None = None) -> None:
        """Build the draft-vocabulary slice of the unembedding now (after `.to(device,
        dtype)`), instead of on the first drafting step. No-op without a draft vocab."""
        if self.draft_vocab is not None:
            self._draft_unembedding(model)

    def project_meta(self) -> dict:
        """What heads.json records about this head type (besides the common fields)."""
        return {"head_type": "medusa", "num_heads": self.num_heads, "num_layers": self.num_layers,
                "own_unembedding": self.lm_heads is not None}

    def head_hidden(self, hidden: torch.Tensor, num_heads: int | None = None) -> torch.Tensor:
        """[B, H] -> [n, B, H] for the first n (default all) heads."""
        return torch.stack([blk(hidden) for blk in self.blocks[:num_heads]])

    def head_logits(self, hidden: torch.Tensor, model: nn.Module,
                    num_heads: int | None = None) -> torch.Tensor:
        """[B, H] -> [n, B, V] float32, or [n, B, |draft_vocab|] when a draft vocabulary is
        set (column j is token draft_vocab[j]); n = the first num_heads heads (default all):
        a tree that drafts two tokens deep needs only two heads' logits."""
        hs = self.head_hidden(hidden, num_heads)
        nh, B, H = hs.shape
        if self.draft_vocab is not None:
            w = self._draft_unembedding(model)
            if w.dim() == 2:  # W @ h^T: BLAS streams the [V', H] slice once for all rows
                return torch.mm(w.to(hs.dtype), hs.reshape(nh * B, H).t()).t().reshape(
                    nh, B, -1).float()
            return torch.bmm(hs, w[:nh].to(hs.dtype).transpose(1, 2)).float()
        if self.lm_heads is None:
            return model.compute_logits(hs.reshape(nh * B, H)).view(nh, B, -1)
        return torch.stack([lm(h) for lm, h in zip(self.lm_heads, hs)]).float()

    def topk_tokens(self, hidden: torch.Tensor, model: nn.Module, k: int,
                    num_heads: int | None = None) -> torch.Tensor:
        """[B, H] -> [n, B, k] token ids, most likely first."""
        logits = self.head_logits(hidden, model, num_heads)
        top = logits.topk(min(k, logits.shape[-1]), dim=-1).indices
        return top if self.draft_vocab is None else self.draft_vocab[top]

    def candidates(self, hidden: torch.Tensor, model: nn.Module, last_tokens: list[int],
                   num_heads: int | None = None, positions: list[int] | None = None
                   ) -> list[list[list[int]]]:
        top = self.topk_tokens(hidden, model, self.topk, num_heads)  # [n, B, k]
        per_head = top.transpose(0, 1).tolist()  # one host sync: [B][n][k]
        return per_head


def load_medusa_heads(folder: Path, base: ModelConfig) -> MedusaHeads:
    """The Medusa authors' layout: config.json + medusa_lm_head.{safetensors,pt}."""
    cfg = json.loads((folder / "config.json").read_text())
    n, layers = int(cfg["medusa_num_heads"]), int(cfg.get("medusa_num_layers", 1))
    weights = next((folder / f for f in ("medusa_lm_head.safetensors", "medusa_lm_head.pt")
                    if (folder / f).exists()), None)
    if weights is None:
        raise ValueError(f"{folder}: medusa_lm_head.safetensors or .pt is missing")
    raw = read_tensors(weights)
    own = any(k == f"0.{layers}.weight" for k in raw)
    heads = MedusaHeads(base.hidden_size, base.vocab_size, n, layers, own_unembedding=own)
    renamed: dict[str, torch.Tensor] = {}
    for k, v in raw.items():
        i, j, rest = k.split(".", 2)
        if int(j) == layers:
            renamed[f"lm_heads.{i}.{rest}"] = v
        else:
            renamed[f"blocks.{i}.{j}.{rest}"] = v
    assign_state(heads, renamed, weights)
    return heads
