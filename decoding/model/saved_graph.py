"""Compiled graphs saved whole (the trunk's, the draft chain's depths), so that a cached
start loads them instead of tracing their Python again.

Why: with inductor's caches warm, a start still runs dynamo over the trunk (30 layers of
Python traced op by op) before inductor finds its kernels in the cache: ~5 s of the
trunk's ~8 s warm compile on a 2-core Xeon (docs/benchmarks.md). torch's `aot_compile`
captures the graph together with the code that feeds it, and `save_compiled_function` /
`load_compiled_function` put that on disk; loading reads it and inductor's compiled
kernels (rebuilt from the source the file bundles when inductor's cache was cleared). The
draft chain's depths (spec/compiled_draft.py) are saved the same way, ~1.5 s of a start.

The file's name is its guard. Dynamo's guards are neither saved whole nor evaluated once
the trunk is warm (compiled.py), so the name digests everything the traced graph was
specialized on (`graph_key`): Python's and torch's versions, our code (every module of
the decoding package and the kernels: the trunk's and the heads' Python), inductor's
options, the CPU (inductor generates code for its vector instructions) and the thread
count (its GEMM templates block for it), and what dynamo reads from the model: every
submodule's class and plain attributes, every tensor's shape, dtype, strides and device.
Tensor values are graph inputs, read from the model at each call. A frozen graph (dense
weights, inductor's `freezing`) holds the weights themselves: it is never saved. An
unreadable file, or one whose graph fails its warm-up pass (`discard`), is deleted and
the graph compiles as if none was there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .device import cpu_flags
from .kernel_build import files_digest, kernels_digest, user_cache_dir
from .prepared_cache import prune

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
KEEP = 16  # files kept (~4 MB a trunk, less a draft depth); the least recently used go
_PLAIN = (bool, int, float, str, type(None), torch.dtype, torch.device)
_PACKAGE = Path(__file__).resolve().parents[1]  # decoding/


@functools.cache
def code_digest() -> str:
    """A digest of the code a saved graph was traced from: every module of the decoding
    package (the trunk's, the heads', the config) and our kernels."""
    return files_digest(sorted(_PACKAGE.rglob("*.py")), seed=kernels_digest(), root=_PACKAGE)


def graph_folder() -> Path:
    return user_cache_dir() / "compiled"


def graph_path(key: str, name: str) -> Path:
    return graph_folder() / f"{name}-{key}.aot"


def _tensor_facts(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {t.dtype} {t.stride()} {t.device}"


def _plain(v: object) -> bool:
    return isinstance(v, _PLAIN) or (isinstance(v, tuple) and all(map(_plain, v)))


def model_facts(model: nn.Module) -> list:
    """What a trace of `model` is specialized on: each submodule's class and plain
    attributes (flags, sizes, eps: constants in the graph) and each tensor's layout."""
    facts = []
    for name, module in model.named_modules():
        fields = []
        for attr, v in sorted(vars(module).items()):
            if attr in ("_parameters", "_buffers"):
                fields += [[k, _tensor_facts(t)] for k, t in sorted(v.items()) if t is not None]
            elif attr.startswith("_"):
                continue
            elif isinstance(v, torch.Tensor):
                fields.append([attr, _tensor_facts(v)])
            elif _plain(v) or dataclasses.is_dataclass(v):
                fields.append([attr, repr(v)])
        facts.append([name, type(module).__qualname__, fields])
    return facts


def graph_key(model: nn.Module, options: dict, extra: dict) -> str:
    """The file name's digest for `model` compiled under inductor `options`; `extra`: what
    else the traced code depends on (the caller's own flags)."""
    key = [FORMAT_VERSION, sys.version, torch.__version__, code_digest(),
           sorted((k, repr(v)) for k, v in options.items()), sorted(extra.items()),
           sorted(cpu_flags() or ()), torch.get_num_threads(), model_facts(model)]
    return hashlib.sha256(repr(key).encode()).hexdigest()[:24]


def load(key: str, name: str) -> Callable | None:
    """The graph `name` saved under `key`, guards off; None when there is none or it cannot
    be read (then it is deleted: the caller compiles and saves it again)."""
    path = graph_path(key, name)
    if not path.is_file():
        return None
    t0 = time.perf_counter()
    try:
        with open(path, "rb") as f:
            fn = torch.compiler.load_compiled_function(f)
        fn.disable_guard_check()
    except Exception as exc:  # noqa: BLE001 -- truncated, another torch's layout: a miss
        log.warning("compiled graph %s unreadable (%s: %s); compiling it again", path,
                    type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        path.unlink(missing_ok=True)
        return None
    with contextlib.suppress(OSError):  # a read-only cache folder still serves
        os.utime(path)  # most recently used: pruning keeps it
    log.info("compiled graph read from %s in %.1f s", path, time.perf_counter() - t0)
    return fn


def save(fn: object, key: str, name: str) -> Path | None:
    """Write `fn` (an aot_compile result) as `name` under `key` (atomically: torch writes a
    temporary and renames it) and prune old files. A failure only logs: the next start
    compiles."""
    path = graph_path(key, name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fn.save_compiled_function(str(path))
    except Exception as exc:  # noqa: BLE001 -- a cache must never stop a start
        log.warning("could not save the compiled graph to %s (%s: %s); the next start "
                    "compiles it again", path, type(exc).__name__, exc)
        return None
    prune(KEEP, graph_folder(), "*.aot")
    return path


def load_or_compile(key: str, name: str, compile_ahead: Callable[[], Any]
                    ) -> tuple[Callable | None, bool]:
    """The graph `name`: read from under `key` (then True), else made by `compile_ahead` (an
    aot_compile call), its guards turned off, and saved (False). (None, False) where
    compiling ahead fails: the caller compiles through torch.compile as it first runs."""
    fn = load(key, name)
    if fn is not None:
        return fn, True
    try:
        fn = compile_ahead()
        fn.disable_guard_check()
    except Exception as exc:  # noqa: BLE001 -- experimental in torch; the lazy path remains
        log.warning("compiling %s ahead of time failed (%s: %s); compiling it at its first "
                    "pass, not saved", name, type(exc).__name__,
                    str(exc).splitlines()[0] if str(exc) else "")
        return None, False
    save(fn, key, name)
    return fn, False


def discard(key: str, name: str) -> None:
    """Delete the graph `name` saved under `key`: it was read but failed to run."""
    log.warning("removing the compiled graph %s: it failed its warm-up; the next start "
                "compiles it again", graph_path(key, name))
    graph_path(key, name).unlink(missing_ok=True)
