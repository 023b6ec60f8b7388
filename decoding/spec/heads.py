"""Draft heads and their checkpoint layouts; `load_heads` detects the layout on disk.

- Medusa residual-block heads (here): the Medusa authors' layout (config.json with
  `medusa_num_heads` + medusa_lm_head.*) or the project's own format (heads.json), with
  the base unembedding shared or their own. Head k (from 1) reads the base model's final
  hidden state at the last accepted token and guesses token t+1+k, t+1 being the
  verifier's own bonus token, which is why candidates start at the second position of a step.
- Meta-style parallel MTP (mtp_parallel.py): params.json with `n_future_tokens`; the extra
  transformer blocks branch off the residual stream entering the last layer and run in
  the verify forward itself, with their own KV-cache layers.
- Sequential MTP modules, DeepSeek-V3 / MiMo (mtp_sequential.py): config.json with
  `num_nextn_predict_layers`; chained drafts, one module per depth (the last one reused).

Draft vocabulary (FR-Spec style, optional): the project format may store a sorted int64
tensor `draft_vocab` of token ids in heads.safetensors (its length is `draft_vocab_size`
in heads.json). Heads then score only those rows of the unembedding (sliced once per
model/device/dtype and cached, not per step) and their top-k are mapped back to token
ids, so drafting costs num_heads x |draft_vocab| instead of num_heads x V per row. Without
it (older folders, the Medusa authors' layout) heads score the full vocabulary.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, SpecConfig

HEADS_FORMAT = "mtpserve-heads"
DRAFT_VOCAB_KEY = "draft_vocab"  # optional int64 tensor in heads.safetensors
SHIPPED_HEADS_DIR = Path(__file__).parents[1] / "heads"


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


class UnembedRows:
    """Rows `ids` of an unembedding, copied once and rebuilt only when the weight (storage,
    device, dtype, shape) or the ids change: drafting reads them every step."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self.rows: torch.Tensor | None = None

    def get(self, src: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        key = (src.data_ptr(), src.device, src.dtype, src.shape, ids.data_ptr(), ids.device)
        if key != self._key:
            with torch.no_grad():
                self.rows = src.detach().index_select(0, ids.to(src.device)).contiguous()
            self._key = key
        return self.rows


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


def check_draft_vocab(ids: torch.Tensor, vocab_size: int, where: str) -> torch.Tensor:
    """A draft vocabulary as int64, or a ValueError naming `where`."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.numel() == 0:
        raise ValueError(f"{where}: draft_vocab must be a non-empty 1-D tensor of token ids")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"{where}: draft_vocab must hold integer token ids, not {ids.dtype}")
    ids = ids.to(torch.int64)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{where}: draft_vocab holds token id {bad}, outside the model's "
                         f"vocabulary of {vocab_size}")
    if ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):
        raise ValueError(f"{where}: draft_vocab must be sorted and without repeats")
    return ids


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


def _tree_in(folder: Path, tree: str) -> str:
    """A default tree given as a JSON file name lives in the heads folder."""
    return str(folder / tree) if tree.endswith(".json") else tree


def load_project_heads(folder: Path, base: ModelConfig) -> DraftHeads:
    """The project's format: heads.json + heads.safetensors, Medusa or sequential heads."""
    from .mtp_sequential import SequentialMTPHeads

    meta_path = folder / "heads.json"
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != HEADS_FORMAT:
        raise ValueError(f"{meta_path}: not an {HEADS_FORMAT} file")
    if meta.get("head_type") not in ("medusa", "sequential"):
        raise ValueError(f"{meta_path}: head type {meta.get('head_type')!r} is not supported "
                         f"(medusa, sequential)")
    if meta.get("hidden_size") != base.hidden_size or meta.get("vocab_size") != base.vocab_size:
        raise ValueError(
            f"{meta_path}: heads were made for hidden {meta.get('hidden_size')} / vocab "
            f"{meta.get('vocab_size')}, the model has {base.hidden_size} / {base.vocab_size}")
    fp = meta.get("base_fingerprint")
    if fp and fp != base.fingerprint():
        raise ValueError(f"{meta_path}: heads belong to base model {fp}, "
                         f"this model is {base.fingerprint()}")
    tree = _tree_in(folder, meta.get("default_tree", "tree16"))
    if meta["head_type"] == "sequential":
        heads: MedusaHeads | SequentialMTPHeads = SequentialMTPHeads.from_project_meta(
            meta, base, tree)
    else:
        heads = MedusaHeads(base.hidden_size, base.vocab_size, int(meta["num_heads"]),
                            int(meta["num_layers"]), bool(meta.get("own_unembedding", False)),
                            default_tree=tree)
    weights = folder / "heads.safetensors"
    tensors = _read_tensors(weights)
    draft_vocab = tensors.pop(DRAFT_VOCAB_KEY, None)
    _assign(heads, tensors, weights)
    size = meta.get("draft_vocab_size")
    if draft_vocab is None and size:
        raise ValueError(f"{weights}: heads.json gives draft_vocab_size {size} but there is "
                         f"no '{DRAFT_VOCAB_KEY}' tensor")
    if draft_vocab is not None:
        heads.set_draft_vocab(draft_vocab, where=str(weights))
        if size is not None and int(size) != draft_vocab.numel():
            raise ValueError(f"{weights}: draft_vocab has {draft_vocab.numel()} ids, "
                             f"{meta_path} says draft_vocab_size {size}")
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


def save_project_heads(heads: DraftHeads, folder: str | Path, base: ModelConfig,
                       training: dict | None = None) -> None:
    """heads.safetensors (+ draft_vocab) and heads.json, for MedusaHeads or the
    project's SequentialMTPHeads (anything with `project_meta()`)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in heads.state_dict().items()}
    if heads.draft_vocab is not None:
        tensors[DRAFT_VOCAB_KEY] = heads.draft_vocab.detach().to(torch.int64).contiguous().cpu()
    save_file(tensors, str(folder / "heads.safetensors"))
    meta = {"format": HEADS_FORMAT, "version": 1, **heads.project_meta(),
            "hidden_size": base.hidden_size, "vocab_size": base.vocab_size,
            "base_fingerprint": base.fingerprint(), "default_tree": heads.default_tree}
    if heads.draft_vocab is not None:
        meta["draft_vocab_size"] = int(heads.draft_vocab.numel())
    meta["training"] = training or {}
    (folder / "heads.json").write_text(json.dumps(meta, indent=2) + "\n")


def add_draft_vocab(folder: str | Path, base: ModelConfig, ids: torch.Tensor,
                    info: dict | None = None) -> None:
    """Store a draft vocabulary in an existing project-format heads folder (replacing any
    earlier one): the `draft_vocab` tensor in heads.safetensors, `draft_vocab_size` and
    `info` (under "draft_vocab") in heads.json. The head weights are untouched."""
    from safetensors.torch import save_file

    folder = Path(folder)
    weights = folder / "heads.safetensors"
    ids = check_draft_vocab(ids, base.vocab_size, str(weights))
    load_project_heads(folder, base)  # refuses folders that do not belong to this base
    tensors = _read_tensors(weights)
    tensors[DRAFT_VOCAB_KEY] = ids.contiguous().cpu()
    tmp = weights.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(weights)
    meta_path = folder / "heads.json"
    meta = json.loads(meta_path.read_text())
    out: dict = {}
    for k, v in meta.items():  # keep the key order, draft_vocab_size before "training"
        if k in ("draft_vocab_size", "draft_vocab"):
            continue
        if k == "training":
            out["draft_vocab_size"] = int(ids.numel())
            if info is not None:
                out["draft_vocab"] = info
        out[k] = v
    out.setdefault("draft_vocab_size", int(ids.numel()))
    if info is not None:
        out.setdefault("draft_vocab", info)
    meta_path.write_text(json.dumps(out, indent=2) + "\n")


def load_heads(path: str | Path, base: ModelConfig) -> DraftHeads:
    """Heads from a folder (or a file in it), the layout detected from what is there."""
    from .mtp_parallel import is_meta_mtp_folder, load_meta_mtp_heads
    from .mtp_sequential import is_sequential_mtp_folder, load_sequential_mtp_heads

    folder = Path(path)
    if folder.is_file():
        folder = folder.parent
    if (folder / "heads.json").exists():
        return load_project_heads(folder, base)
    if (folder / "config.json").exists() and "medusa_num_heads" in (folder / "config.json").read_text():
        return load_medusa_heads(folder, base)
    if is_meta_mtp_folder(folder):
        return load_meta_mtp_heads(folder, base)
    if is_sequential_mtp_folder(folder):
        return load_sequential_mtp_heads(folder, base)
    raise ValueError(f"{path}: no draft heads found (expected heads.json, a Medusa config.json, "
                     f"a Meta params.json with n_future_tokens or a config.json with "
                     f"num_nextn_predict_layers)")


def shipped_heads(fingerprint: str, head_type: str | None = None) -> Path | None:
    """The heads folder shipped for a base model (by config fingerprint): its default
    `<fingerprint>/`, or with `head_type` the first shipped folder of that type among
    `<fingerprint>/` and `<fingerprint>-*/` (e.g. the Medusa heads kept beside sequential
    default heads for vLLM's Medusa export). None when there is none."""
    default = SHIPPED_HEADS_DIR / fingerprint
    if head_type is None:
        return default if (default / "heads.json").exists() else None
    for folder in [default, *sorted(SHIPPED_HEADS_DIR.glob(f"{fingerprint}-*"))]:
        meta = folder / "heads.json"
        if meta.exists() and json.loads(meta.read_text()).get("head_type") == head_type:
            return folder
    return None


def load_heads_for(spec: SpecConfig, base: ModelConfig, model_path: str, device: torch.device,
                   dtype: torch.dtype, model: nn.Module | None = None) -> DraftHeads | None:
    """Heads named by --heads, else heads shipped for this exact base model, else none.
    With `model`, a draft vocabulary's slice of its unembedding is built now rather than
    on the first drafting step."""
    if spec.mode == "off" or spec.proposer == "ngram":
        return None
    path = spec.heads_path
    if path is None:
        shipped = shipped_heads(base.fingerprint())
        if shipped is None:
            return None
        path = str(shipped)
    if not os.path.exists(path):
        raise ValueError(f"{path}: heads path does not exist")
    heads = load_heads(path, base).to(device=device, dtype=dtype).eval()
    if model is not None:
        heads.prepare(model)
    return heads
