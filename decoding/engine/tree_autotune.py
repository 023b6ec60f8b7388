"""`--tree auto`: the draft tree for these heads on this machine, chosen at the engine's
first start here and cached.

A tree pays when the tokens it is expected to add (the heads' held-out rank accuracies,
heads.json) outweigh what verifying its nodes and drafting its depth cost, and those
costs differ between CPUs, kernels and the compiled or eager step: a tree shipped from one
machine can be wrong on another. So the engine measures them (step_costs.py: a verify
pass of every candidate size at a 300-token context, drafting per depth; ~4 s on 2
cores), ranks the candidates (spec/tree_choice.py) and writes the choice under
~/.cache/mtpserve/trees/, keyed by everything that moves the costs or the accuracies; a
later start on the same machine reads it. Heads without accuracies (other layouts, tests'
heads objects) keep their default tree, as `--tree default` always does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..model.kernel_build import kernels_digest, user_cache_dir
from ..spec.tree_choice import (
    deeper_trees_can_win,
    monotone_costs,
    rank_trees,
    tree_candidates,
    tree_depth,
)
from .step_costs import draft_times, verify_times

# `engine` below is an LLMEngine, not imported: llm_engine imports this module

log = logging.getLogger(__name__)

CONTEXT = 300  # committed tokens behind the timed passes (the bench's default too)
RUNS = 10  # timed runs per size (median)
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")


def heads_accuracies(folder: str | Path | None, topk: int | None = None) -> dict | None:
    """{'path', 'rank_acc', 'chain_only', 'digest'} of a heads folder whose heads.json
    carries held-out rank accuracies (train-heads writes them); None otherwise."""
    if folder is None:
        return None
    meta_path = Path(folder) / "heads.json"
    if not meta_path.is_file():
        return None
    raw = meta_path.read_bytes()
    meta = json.loads(raw)
    rank_acc = meta.get("training", {}).get("heldout", {}).get("rank_acc")
    if not rank_acc:
        return None
    return {"path": str(folder), "rank_acc": [r[:topk] for r in rank_acc] if topk else rank_acc,
            "chain_only": meta.get("head_type") == "sequential",
            "digest": hashlib.sha256(raw).hexdigest()[:16]}


def machine_key(engine: Any, acc: dict, draft_compiled: bool | None = None) -> dict:
    """What the measured costs and the accuracies depend on: the cache entry's key.
    draft_compiled: whether drafting is compiled, when asked before the chain is."""
    flags: set[str] = set()
    model_name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
            if flags and model_name:
                break
    except OSError:
        pass
    device = (torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda"
              else model_name)
    model = engine.model
    return {"heads": acc["digest"], "model": engine.model_config.fingerprint(),
            "device": device, "cpu_flags": sorted(f for f in CPU_FLAGS if f in flags),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "weights": engine.weight_format, "int4_kernel": getattr(model, "int4_kernel", ""),
            "attention": getattr(model, "attention_kernel", ""),
            "unembed": getattr(model, "unembed_format", ""),
            "compiled": engine.compiled is not None,
            "kernels": kernels_digest(),  # a kernel's new version moves the costs
            "ranking": 2,  # 2: monotone verify costs; entries ranked before are measured again
            # drafting compiled (compiled_draft.py) or eager: a depth's cost differs
            "draft_compiled": (getattr(engine.heads, "compiled_chain", None) is not None
                               if draft_compiled is None else draft_compiled)}


def cache_file(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return user_cache_dir() / "trees" / f"{digest}.json"


def measure_and_rank(engine: Any, acc: dict, context: int = CONTEXT, runs: int = RUNS,
                     before_depth: Callable[[int], None] | None = None, prune: bool = False
                     ) -> dict:
    """Time every candidate tree's verify size and the drafting per depth here, then rank
    the candidates by expected speed over plain decoding: {'verify_ms', 'draft_ms', 'rows'}.
    before_depth(d) runs before depth d is timed (the engine compiles that depth's graph);
    prune: stop at the first depth from which no deeper tree can win (tree_choice's bound),
    leaving deeper drafts untimed, uncompiled and out of the ranking."""
    cands = tree_candidates(acc["rank_acc"], chain_only=acc["chain_only"])
    sizes = sorted({1} | {1 + len(c) for c in cands.values()})
    context = max(1, min(context, engine.kv.slot_len - max(sizes) - 1))
    filler = [(7 * i + 11) % engine.model_config.vocab_size for i in range(context)]
    # the fastest of the runs: the pass's own cost, without what else the machine did
    measured = {r["k"]: r["ms_min"] for r in verify_times(engine, filler, context, sizes, runs)}
    verify_ms = monotone_costs(measured)
    depths = len(acc["rank_acc"])
    draft_ms: dict[int, float] = {}
    for d in range(1, depths + 1):
        if prune and d > 1 and not deeper_trees_can_win(cands, acc["rank_acc"], verify_ms,
                                                        draft_ms, d):
            log.info("--tree auto: no tree drafting %d or more deep can pay here: depths "
                     "%d-%d neither timed nor compiled", d, d, depths)
            break
        if before_depth is not None:
            before_depth(d)
        draft_ms.update(draft_times(engine, d, context, runs, first=d))
    cands = {n: c for n, c in cands.items() if tree_depth(c) in draft_ms}
    return {"context": context, "verify_ms": verify_ms, "verify_ms_measured": measured,
            "draft_ms": draft_ms,
            "rows": rank_trees(cands, acc["rank_acc"], verify_ms, draft_ms)}


def autotune_tree(engine: Any, folder: str | Path | None,
                  before_depth: Callable[[int], None] | None = None
                  ) -> list[tuple[int, ...]] | None:
    """The tree `--tree auto` serves with: cached for this machine, else measured now
    (measure_and_rank, pruned; before_depth compiles each depth it times) and cached.
    None: the heads carry no accuracies (the caller keeps their default tree)."""
    acc = heads_accuracies(folder, getattr(engine.heads, "topk", None))
    if acc is None:
        return None
    key = machine_key(engine, acc)
    path = cache_file(key)
    if path.is_file():
        if (best := _cached_best(path)) is not None:
            log.info("--tree auto: %s (%d nodes), measured on this machine before (%s)",
                     best["tree"], best["nodes"], path)
            return [tuple(c) for c in best["choices"]]
        log.warning("--tree auto: unreadable cache entry %s; measuring again", path)
    log.info("--tree auto: timing verify passes and drafting for the heads' candidate trees "
             "on this machine (once; cached under %s)", path.parent)
    t0 = time.perf_counter()
    got = measure_and_rank(engine, acc, before_depth=before_depth, prune=True)
    best = got["rows"][0]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "best": best, "top": got["rows"][:8],
                               "verify_ms": got["verify_ms"],
                               "verify_ms_measured": got["verify_ms_measured"],
                               "draft_ms": got["draft_ms"],
                               "context": got["context"],
                               "date": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=1))
    tmp.replace(path)  # whole or not at all: a crash mid-write leaves no half entry
    log.info("--tree auto: %s (%d nodes, expected %.2fx plain decoding) in %.1f s",
             best["tree"], best["nodes"], best["speedup_vs_plain"], time.perf_counter() - t0)
    return [tuple(c) for c in best["choices"]]


def heads_folder(engine: Any) -> str | Path | None:
    """The engine's heads folder: --heads, else the shipped one for its model."""
    from ..spec.heads_io import shipped_heads

    return engine.config.spec.heads_path or shipped_heads(engine.model_config.fingerprint())


def cached_tree(engine: Any, draft_compiled: bool | None = None
                ) -> list[tuple[int, ...]] | None:
    """The tree --tree auto measured on this machine before, for the engine's heads, read
    without measuring anything; None when there is none (or no accuracies)."""
    acc = heads_accuracies(heads_folder(engine), getattr(engine.heads, "topk", None))
    if acc is None:
        return None
    best = _cached_best(cache_file(machine_key(engine, acc, draft_compiled)))
    return [tuple(c) for c in best["choices"]] if best is not None else None


def _cached_best(path: Path) -> dict | None:
    """A cache entry's best tree ({'tree', 'nodes', 'choices', ...}); None if unreadable."""
    try:
        best = json.loads(path.read_text())["best"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    ok = isinstance(best, dict) and {"choices", "tree", "nodes"} <= best.keys()
    return best if ok else None


def tree_for_this_machine(engine: Any, before_depth: Callable[[int], None] | None = None
                          ) -> list[tuple[int, ...]] | None:
    """autotune_tree for the engine's heads folder (--heads, else the shipped one); None:
    keep the heads' default tree (no accuracies, or the measurement failed: a warning,
    never a failed start)."""
    try:
        return autotune_tree(engine, heads_folder(engine), before_depth)
    except Exception as e:  # noqa: BLE001 - a timing run must never stop the server
        log.warning("--tree auto: calibration failed (%s: %s); serving the heads' default "
                    "tree", type(e).__name__, e)
        return None
