"""Folders vLLM can load, prepared from what mtpserve serves: the model (vLLM loads
Hugging Face folders, so a GGUF, the default embedded model included, is exported once,
float32, GGUF blocks dequantized exactly, into `<cache>/models/<name>-<key>`; a folder with
config.json is served as it is) and the draft heads (a project-format folder is exported
with `export-heads --format vllm-medusa` into `<cache>/heads/<key>`; a folder already in
vLLM's Medusa format is used as it is).

Heads with a draft vocabulary are exported over the full vocabulary: vLLM 0.32's Medusa
loader refuses any checkpoint with a `token_map`.

Separate from the backend (vllm_backend.py): this is file work with the project's own
exporters (decoding/tools/export.py) and needs no vLLM.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .vllm_options import BackendConfigError

log = logging.getLogger(__name__)

CACHE_ENV = "MTPSERVE_CACHE_DIR"
EXPORT_META = "mtpserve_export.json"


def default_cache_dir() -> Path:
    base = os.environ.get(CACHE_ENV)
    if base:
        return Path(base) / "vllm"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "mtpserve" / "vllm"


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def _stat_key(path: Path) -> list:
    """Identity of a file or folder's files: names, sizes, mtimes."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def _publish(tmp: Path, final: Path) -> Path:
    """Move a finished export into place (atomic rename; a concurrent winner is kept)."""
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; another user (a container) reads it
    try:
        os.replace(tmp, final)
    except OSError:
        if not (final / EXPORT_META).exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return final


@dataclass
class PreparedModel:
    hf_dir: Path
    name: str
    fingerprint: str | None
    source: str
    _ck: Any = None

    def checkpoint(self) -> Any:
        """The loaded checkpoint (float32), for exporting heads; loaded at most once."""
        if self._ck is None:
            import torch

            from mtpserve.decoding.model.checkpoint import load_checkpoint

            self._ck = load_checkpoint(self.source, torch.float32)
        return self._ck


def prepare_model(model: str | None, cache_dir: Path) -> PreparedModel:
    """A Hugging Face folder vLLM can load for `model` (exported once per GGUF file)."""
    from mtpserve.decoding.model.checkpoint import default_model_path

    src = Path(model or default_model_path())
    if not src.exists():
        raise BackendConfigError(f"{src}: no such file or directory")
    if src.is_dir() and (src / "config.json").exists():
        meta_path = src / EXPORT_META
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            return PreparedModel(src, meta["name"], meta.get("fingerprint"), str(src))
        return PreparedModel(src, src.name, None, str(src))
    out = cache_dir / "models" / f"{src.stem}-{_key(_stat_key(src), 'float32')}"
    if (out / EXPORT_META).exists():
        meta = json.loads((out / EXPORT_META).read_text())
        log.info("vLLM model folder: %s (exported earlier from %s)", out, src)
        return PreparedModel(out, meta["name"], meta.get("fingerprint"), str(src))
    import torch

    from mtpserve.decoding.model.checkpoint import load_checkpoint
    from mtpserve.decoding.tools.export import export_checkpoint

    log.info("exporting %s to a Hugging Face folder for vLLM: %s", src, out)
    t0 = time.monotonic()
    ck = load_checkpoint(str(src), torch.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent))
    export_checkpoint(ck, tmp, "float32", force=True)
    (tmp / EXPORT_META).write_text(json.dumps(
        {"name": ck.name, "fingerprint": ck.config.fingerprint(), "source": str(src)}))
    _publish(tmp, out)
    log.info("exported in %.1fs", time.monotonic() - t0)
    return PreparedModel(out, ck.name, ck.config.fingerprint(), str(src), ck)


def _is_vllm_medusa(folder: Path) -> bool:
    cfg = folder / "config.json"
    if not cfg.exists():
        return False
    try:
        return json.loads(cfg.read_text()).get("model_type") == "medusa"
    except ValueError:
        return False


def prepare_heads(heads: str | None, model: PreparedModel, cache_dir: Path,
                  required: bool) -> tuple[Path, int] | None:
    """(vLLM Medusa folder, number of heads) for `heads` (None: the heads shipped for the
    model), exporting a project-format folder once; None when there are none (an error
    when `required`)."""
    from mtpserve.decoding.spec.heads_io import shipped_heads

    if heads is None:
        # vLLM's Medusa is the one head type it can take from us: the shipped default may
        # be sequential heads, with Medusa heads shipped beside them for this export.
        shipped = shipped_heads(model.fingerprint, "medusa") if model.fingerprint else None
        if shipped is None:
            if required:
                raise BackendConfigError(
                    f"--proposer heads: no Medusa draft heads are shipped for {model.name}; "
                    f"pass --heads DIR (train them with `mtpserve train-heads`)")
            return None
        src = shipped
    else:
        src = Path(heads)
        if not src.is_dir():
            raise BackendConfigError(f"--heads {heads}: not a folder")
    if _is_vllm_medusa(src):
        cfg = json.loads((src / "config.json").read_text())
        if int(cfg.get("truncated_vocab_size") or cfg["vocab_size"]) < int(cfg["vocab_size"]):
            raise BackendConfigError(
                f"--heads {src}: a draft vocabulary (token_map) that vLLM's Medusa loader "
                f"refuses; pass the project-format heads folder instead (mtpserve exports it "
                f"over the full vocabulary)")
        out = src
    else:
        out = cache_dir / "heads" / f"{src.name}-{_key(_stat_key(src), str(model.hf_dir), 'full-vocab')}"
        if not (out / EXPORT_META).exists():
            from mtpserve.decoding.tools.export import export_heads_vllm
            from mtpserve.decoding.spec.heads_io import load_heads

            log.info("exporting draft heads %s for vLLM (vllm-medusa): %s", src, out)
            ck = model.checkpoint()
            try:
                h = load_heads(str(src), ck.config)
            except ValueError as exc:
                raise BackendConfigError(f"--heads {src}: {exc}") from None
            if type(h).__name__ != "MedusaHeads":  # MTP layouts: vLLM's Medusa can't load
                raise BackendConfigError(
                    f"--heads {src}: {getattr(h, 'kind', type(h).__name__)} heads have no "
                    f"vLLM Medusa export; serve them with --backend native")
            if getattr(h, "draft_vocab", None) is not None:
                # vLLM 0.32's Medusa loader assigns `token_map` as a parameter but does not
                # report it loaded, so its strict weight check refuses every checkpoint that
                # has one ("weights were not initialized from checkpoint: {'token_map'}").
                # Export over the full vocabulary instead: drafts are each head's argmax
                # over all tokens rather than over the draft vocabulary; verification (and
                # so the output) is unchanged.
                log.warning("draft heads %s restrict drafts to %d tokens; vLLM's Medusa "
                            "cannot load a token_map, so they are exported over the full "
                            "vocabulary", src, int(h.draft_vocab.numel()))
                h.set_draft_vocab(None)
            unembed = None
            if h.lm_heads is None:
                unembed = ck.tensors["embed_tokens.weight" if ck.config.tie_word_embeddings
                                     else "lm_head.weight"]
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent))
            export_heads_vllm(h, ck.config, unembed, tmp, "float32", force=True)
            (tmp / EXPORT_META).write_text(json.dumps({"source": str(src)}))
            _publish(tmp, out)
    num_heads = int(json.loads((out / "config.json").read_text())["num_heads"])
    return out, num_heads
