"""The served model as loading leaves it (quantized and packed for this machine's kernels),
kept under the user's cache folder so that a later start reads it back instead of doing
the work again.

Why: of a cached start's 19 s on a 2-core Xeon (session 21), ~10 s went to reading the
GGUF file (gguf-py parses its 100k tokenizer strings one memmap slice at a time),
dequantizing it to fp32 and quantizing and packing it again; the prepared model is one
torch.load of tensors already in their kernels' layouts.

What must match for an entry to be used, so that a stale entry is never served:
- the key (`prepared_key`): this module's format version, torch's version, a digest of the
  sources whose objects the entry holds (decoding/model/*.py, config.py, the kernels),
  the checkpoint's files (path, size, mtime) and every setting loading reads;
- the facts (`machine_facts`, stored in the entry and compared after it is read): the
  kernels this process can run (which int4 kernel, whether the Q8 unembedding kernel
  loads), which a copied cache folder or a missing compiler can change under one key.
Anything unreadable or unmatched is a miss: the model is prepared from the checkpoint and
the entry written again. Only quantized trunks with the Q8 unembedding are kept: that is
what a CPU serves by default, and those tensors are plain data (FBGEMM's packed fp16
unembedding, for one, holds a pointer and must not be pickled).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import int4_vnni, q8_unembed
from .device import cpu_has_native_bf16
from .int4_format import resolve_int4_kernel
from .kernel_build import aligned64, files_digest, kernels_digest, user_cache_dir

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
KEEP = 2  # entries kept (~0.2 GB each for the default model); the least recently used go
_SOURCES = Path(__file__).resolve().parent


def cache_folder() -> Path:
    return user_cache_dir() / "prepared"


def sources_digest() -> str:
    """A digest of the code whose objects an entry pickles: a changed class is a miss."""
    return files_digest([*sorted(_SOURCES.glob("*.py")), _SOURCES.parent / "config.py"],
                        seed=kernels_digest())  # the kernels too, whose layouts it holds


def checkpoint_stamp(path: str) -> list:
    """(name, size, mtime_ns) of the checkpoint file, or of every file in its folder."""
    p = Path(path).resolve()
    files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
    return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def prepared_key(settings: dict, checkpoint: str) -> str:
    """The entry's name for these load settings and checkpoint (see the module docstring)."""
    key = {"format": FORMAT_VERSION, "torch": torch.__version__, "sources": sources_digest(),
           "checkpoint": checkpoint_stamp(checkpoint), "settings": settings}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def worth_keeping(model: torch.nn.Module) -> bool:
    """What is cached (see the module docstring): a quantized trunk with the Q8 unembedding."""
    return model.weight_format in ("int8", "int4") and model.unembed_format == "q8"


def machine_facts(weights: str, int4_kernel: str, unembed: str) -> dict:
    """What this process can run that a prepared model of `weights` was packed for (see
    the module docstring); asking loads the kernels involved, as serving would."""
    facts: dict = {"weights": weights, "native_bf16": cpu_has_native_bf16()}
    if weights == "int4":
        facts["int4_kernel"] = resolve_int4_kernel(int4_kernel, "cpu")
        facts["int4_isa"] = int4_vnni.isa() if facts["int4_kernel"] != "aten" else 0
    if weights in ("int8", "int4") and unembed in ("auto", "q8"):
        facts["q8_unembed"] = q8_unembed.available()
    return facts


def entry_path(key: str) -> Path:
    return cache_folder() / f"{key}.pt"


def load_entry(key: str, facts_now: Callable[[str], dict]) -> dict | None:
    """The entry `key` when it exists, reads back and was prepared under the facts
    `facts_now(its weight format)` gives now; None otherwise (a miss)."""
    path = entry_path(key)
    if not path.is_file():
        return None
    t0 = time.perf_counter()
    try:
        # our own file in the user's cache folder (as inductor's compiled code is): the
        # model object is pickled, not only tensors
        entry = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as exc:  # noqa: BLE001 -- truncated, corrupt, a class renamed: all misses
        log.warning("prepared model %s unreadable (%s: %s); preparing it again", path,
                    type(exc).__name__, exc)
        return None
    if not isinstance(entry, dict) or entry.get("key") != key:
        log.warning("prepared model %s is not the entry it is named for; preparing it again",
                    path)
        return None
    now = facts_now(str(entry.get("weights")))
    if entry.get("facts") != now:
        log.info("prepared model %s was made for other kernels (%s, now %s); preparing it "
                 "again", path, entry.get("facts"), now)
        return None
    with contextlib.suppress(OSError):  # a read-only cache folder still serves
        os.utime(path)  # most recently used: pruning keeps it
    log.info("model: prepared weights read from %s in %.1f s", path, time.perf_counter() - t0)
    return entry


def save_entry(key: str, facts: dict, payload: dict[str, Any]) -> Path | None:
    """Write the entry atomically (a save cut short never leaves a half file under the
    key's name) and prune old ones. A failure (read-only or full disk) only logs."""
    path = entry_path(key)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        torch.save({"key": key, "facts": facts, **payload}, tmp)
        tmp.replace(path)
        log.info("model: prepared weights saved to %s in %.1f s (the next start reads them)",
                 path, time.perf_counter() - t0)
    except Exception as exc:  # noqa: BLE001 -- a cache must never stop a start
        log.warning("could not save the prepared model to %s (%s: %s); the next start "
                    "prepares it again", path, type(exc).__name__, exc)
        with contextlib.suppress(OSError):
            tmp.unlink()
        return None
    prune(KEEP)
    return path


def realign(model: torch.nn.Module) -> None:
    """The kernels' packed weights of a model read back by load_entry on 64-byte
    boundaries, as the kernels require (a copy only where the file did not align them)."""
    for m in model.modules():
        packed = getattr(m, "int4_vnni", None)
        if isinstance(packed, torch.Tensor):
            m.int4_vnni = aligned64(packed)
    if getattr(model, "unembed_q8", None) is not None:
        model.unembed_q8 = aligned64(model.unembed_q8)


def prune(keep: int, folder: Path | None = None, pattern: str = "*.pt") -> list[Path]:
    """Remove all but the `keep` most recently used entries of `folder` (default: the
    prepared models') and stray temporaries of saves that died; returns what was removed."""
    folder = cache_folder() if folder is None else folder
    if not folder.is_dir():
        return []
    entries = sorted(folder.glob(pattern), key=lambda f: f.stat().st_mtime, reverse=True)
    gone = entries[keep:]
    stale = time.time() - 3600  # a temporary this old belongs to no save in progress
    gone += [f for f in folder.glob("*.tmp") if f.stat().st_mtime < stale]
    for f in gone:
        f.unlink(missing_ok=True)
    return gone
