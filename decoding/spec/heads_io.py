"""Heads folders on disk: the project's own format (heads.json + heads.safetensors, for
Medusa or sequential MTP heads, optionally with a draft vocabulary) read and written,
the layout of any heads folder detected (`load_heads`), and the heads shipped for a base
model found (`shipped_heads`, `load_heads_for`).

The dispatcher over the layouts: it imports every layout (heads.py for Medusa,
mtp_parallel.py, mtp_sequential.py) and none of them imports it, so loading stays free
of import circles.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..config import ModelConfig, SpecConfig
from .draft_vocab import DRAFT_VOCAB_KEY, check_draft_vocab
from .heads import DraftHeads, MedusaHeads, load_medusa_heads
from .mtp_common import assign_state, read_tensors
from .mtp_parallel import is_meta_mtp_folder, load_meta_mtp_heads
from .mtp_sequential import (SequentialMTPHeads, is_sequential_mtp_folder,
                             load_sequential_mtp_heads)

HEADS_FORMAT = "mtpserve-heads"
SHIPPED_HEADS_DIR = Path(__file__).parents[1] / "heads"


def _tree_in(folder: Path, tree: str) -> str:
    """A default tree given as a JSON file name lives in the heads folder."""
    return str(folder / tree) if tree.endswith(".json") else tree


def load_project_heads(folder: Path, base: ModelConfig) -> DraftHeads:
    """The project's format: heads.json + heads.safetensors, Medusa or sequential heads."""
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
    tensors = read_tensors(weights)
    draft_vocab = tensors.pop(DRAFT_VOCAB_KEY, None)
    assign_state(heads, tensors, weights)
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
    tensors = read_tensors(weights)
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
