"""The frozen trunk, run once: its final-normed hidden states h_t, its greedy choice and the
data's next token at every position, cached on disk and reused while the data is the same.

Why: heads on a frozen trunk train for several epochs over the same h_t; running the
trunk once and training over the cache makes an epoch cost one residual block per head.
Also here: splitting data into trunk windows, the train/held-out split of sequences and
the per-head targets read from the cache, which every head type shares.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..model.attention_metadata import AttentionMetadata
from ..model.kv_cache import KVCache
from .heads_data import Example

if TYPE_CHECKING:
    from ..model.trunk import CausalLM


@dataclass(slots=True)
class HiddenCache:
    hidden: torch.Tensor  # [N, H] float32: h_t of every cached position
    argmax: torch.Tensor  # [N] int64: base greedy prediction after position t (for x_{t+1})
    tokens: torch.Tensor  # [N] int64: x_{t+1} (the data's next token; -1 at a sequence end)
    seq_start: torch.Tensor  # [S + 1] int64: sequence s occupies [seq_start[s], seq_start[s+1])
    train_from: torch.Tensor  # [S] int64: first trained position, relative to its sequence

    @property
    def num_seqs(self) -> int:
        return len(self.train_from)


def _causal_meta(n: int, device: torch.device) -> AttentionMetadata:
    """One sequence of n positions, causal, written to KV slots 0..n-1."""
    ar = torch.arange(n, device=device)
    return AttentionMetadata(
        positions=ar, token_slots=torch.zeros_like(ar), token_store=ar,
        seq_slots=torch.zeros(1, dtype=torch.long, device=device), slot_start=0, kv_len=n,
        num_seqs=1, q_len=n, q_gather=None, q_scatter=None,
        mask=torch.ones(n, n, dtype=torch.bool, device=device).tril_()[None, None])


def chunk_examples(examples: list[Example], seq_len: int) -> list[Example]:
    """Split long sequences into windows of seq_len (positions restart in each)."""
    out = []
    for ex in examples:
        if len(ex.ids) < 2:
            continue
        for s in range(0, len(ex.ids), seq_len):
            ids = ex.ids[s:s + seq_len]
            if len(ids) >= 2 and s + len(ids) - 1 > ex.train_from:
                out.append(Example(ids, max(0, ex.train_from - s)))
    return out


CHECKPOINT_S = 600.0  # a long trunk pass saves what it has this often


@torch.no_grad()
def cache_hidden(model: CausalLM, examples: list[Example],
                 progress: Callable[[str], None] | None = None,
                 kv_dtype: torch.dtype | None = None,
                 checkpoint: Callable[[HiddenCache, int], None] | None = None,
                 checkpoint_s: float | None = None) -> HiddenCache:
    """Run the trunk over every example (one at a time, causal) and collect h_t, the base
    argmax and the next token at every position. The argmax (a full-vocabulary unembedding
    per row) is computed only from each example's train_from on, where targets are read
    (-1 before). `checkpoint(partial, done)` is called every `checkpoint_s` seconds
    (default CHECKPOINT_S) with the first `done` examples' cache, so a long pass can be
    saved and resumed."""
    checkpoint_s = CHECKPOINT_S if checkpoint_s is None else checkpoint_s
    dev = next(model.parameters()).device
    kv_dtype = kv_dtype or next(model.parameters()).dtype
    hid, amax, nxt, starts, train_from = [], [], [], [0], []

    def partial() -> HiddenCache:
        return HiddenCache(torch.cat(hid), torch.cat(amax), torch.cat(nxt),
                           torch.tensor(starts), torch.tensor(train_from))

    longest = max(len(e.ids) for e in examples)
    kv = KVCache(model.config, 1, longest, kv_dtype, dev)
    t0 = last_save = time.perf_counter()
    for i, ex in enumerate(examples):
        ids = torch.tensor(ex.ids, dtype=torch.long, device=dev)
        h = model(ids, _causal_meta(len(ex.ids), dev), kv)
        hid.append(h.float().cpu())
        a = torch.full((len(ex.ids),), -1, dtype=torch.long)
        a[ex.train_from:] = model.compute_logits(h[ex.train_from:]).argmax(-1).cpu()
        amax.append(a)
        nxt.append(torch.tensor(ex.ids[1:] + [-1]))
        starts.append(starts[-1] + len(ex.ids))
        train_from.append(ex.train_from)
        now = time.perf_counter()
        if progress and ((i + 1) % 100 == 0 or i + 1 == len(examples)):
            rate = starts[-1] / max(now - t0, 1e-9)
            left = sum(len(e.ids) for e in examples[i + 1:]) / max(rate, 1e-9)
            progress(f"trunk pass {i + 1}/{len(examples)} sequences, {starts[-1]} positions, "
                     f"{now - t0:.0f} s, {rate:.0f} positions/s, ~{left / 60:.0f} min left")
        if checkpoint and now - last_save >= checkpoint_s and i + 1 < len(examples):
            checkpoint(partial(), i + 1)
            last_save = time.perf_counter()
    return partial()


def targets_for(cache: HiddenCache, seqs: list[int], num_heads: int, mode: str
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Trainable positions of `seqs` and their targets: -> rows [M], targets [M, K]
    (-1 where t+k runs past the sequence)."""
    rows, tgts = [], []
    src = cache.argmax if mode == "argmax" else cache.tokens
    for s in seqs:
        a, b = int(cache.seq_start[s]), int(cache.seq_start[s + 1])
        first = a + int(cache.train_from[s])
        # head k at t reads target src[t + k]; the last usable t has t + 1 < b.
        t = torch.arange(first, b - 1)
        if len(t) == 0:
            continue
        k = torch.arange(1, num_heads + 1)
        idx = t[:, None] + k[None, :]  # [M, K]
        valid = idx < b
        tg = src[idx.clamp(max=b - 1)]
        if mode == "tokens":
            valid &= tg >= 0
        rows.append(t)
        tgts.append(torch.where(valid, tg, torch.full_like(tg, -1)))
    if not rows:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, num_heads, dtype=torch.long)
    return torch.cat(rows), torch.cat(tgts)


def split_sequences(n: int, frac: float, seed: int) -> tuple[list[int], list[int]]:
    """Sequence indices -> (trained, held out): a seeded shuffle, `frac` of them held out
    (at least one when frac > 0 and there are two or more)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g).tolist()
    n_hold = int(round(n * frac)) if n > 1 else 0
    if frac > 0 and n > 1:
        n_hold = max(1, n_hold)
    return sorted(perm[n_hold:]), sorted(perm[:n_hold])


def data_key(examples: list[Example]) -> str:
    """A short hash of the examples (ids and train_from): the cache and checkpoint key."""
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.train_from, e.ids]).encode())
    return h.hexdigest()[:16]


def _example_keys(examples: list[Example]) -> list[str]:
    return [hashlib.sha256(json.dumps([e.train_from, e.ids]).encode()).hexdigest()[:16]
            for e in examples]


def _first_sequences(cache: HiddenCache, n: int) -> HiddenCache:
    end = int(cache.seq_start[n])
    return HiddenCache(cache.hidden[:end], cache.argmax[:end], cache.tokens[:end],
                       cache.seq_start[:n + 1], cache.train_from[:n])


def _joined(a: HiddenCache, b: HiddenCache) -> HiddenCache:
    return HiddenCache(torch.cat([a.hidden, b.hidden]), torch.cat([a.argmax, b.argmax]),
                       torch.cat([a.tokens, b.tokens]),
                       torch.cat([a.seq_start, b.seq_start[1:] + a.seq_start[-1]]),
                       torch.cat([a.train_from, b.train_from]))


def load_or_cache_hidden(model: CausalLM, examples: list[Example], path: Path,
                         say: Callable[[str], None], kv_dtype: torch.dtype | None = None,
                         trunk: str = "dense") -> tuple[HiddenCache, dict]:
    """Run the trunk once and keep the result in `path`; reuse it while the data and the
    trunk's weight format (`trunk`: dense, int4, ...) are the same. Data that only adds
    sequences after the cached ones (a new --data file at the end) reuses the cached ones
    and runs the trunk on the new ones alone; a pass interrupted after one of its periodic
    saves resumes the same way."""
    key, keys = data_key(examples), _example_keys(examples)
    if trunk != "dense":  # caches written before the trunk was a choice were dense
        key = f"{key}/{trunk}"
    saved = torch.load(path, weights_only=False) if path.exists() else {}
    if saved.get("key") == key:
        say(f"hidden states: reusing {path}")
        return HiddenCache(**saved["cache"]), {"reused": str(path), "seconds": saved.get("seconds"),
                                               "weights": trunk}
    old_keys = saved.get("example_keys", []) if saved.get("trunk", "dense") == trunk else []
    n = 0
    while n < min(len(old_keys), len(keys)) and old_keys[n] == keys[n]:
        n += 1
    prefix = _first_sequences(HiddenCache(**saved["cache"]), n) if n else None
    before = (saved.get("seconds") or 0.0) if n else 0.0
    del saved
    if n:
        say(f"hidden states: reusing {n} of {len(examples)} sequences from {path}")
    t0 = time.perf_counter()

    def save(part: HiddenCache | None, done: int, final: bool) -> HiddenCache:
        cache = prefix if part is None else part if prefix is None else _joined(prefix, part)
        seconds = round(time.perf_counter() - t0 + before, 1)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"key": key if final else None, "example_keys": keys[:n + done],
                    "trunk": trunk, "seconds": seconds,
                    "cache": {f: getattr(cache, f) for f in HiddenCache.__slots__}}, tmp)
        tmp.replace(path)  # a save cut short never replaces the last good one
        if not final:
            say(f"hidden states: saved {n + done} of {len(examples)} sequences to {path} "
                "(a rerun resumes from here)")
        return cache

    part = None
    if n < len(examples):
        part = cache_hidden(model, examples[n:], progress=say, kv_dtype=kv_dtype,
                            checkpoint=lambda p, done: save(p, done, final=False))
    cache = save(part, len(examples) - n, final=True)
    # "seconds": what the whole cache cost, over every pass that built it (kept with the
    # cache); the rate of this pass comes from the *_this_run pair alone
    now = round(time.perf_counter() - t0, 1)
    info: dict = {"seconds": round(now + before, 1), "weights": trunk, "seconds_this_run": now,
                  "positions_this_run": int(cache.seq_start[-1])
                  - (int(prefix.seq_start[-1]) if prefix is not None else 0)}
    if n:
        info["reused_sequences"] = n
    return cache, info


def argmax_agreement(cache: HiddenCache) -> dict:
    """Trained positions, and how often the base argmax equals the data's next token there
    (1.0 on the model's own greedy answers: the trunk pass reproduces the generation)."""
    same, n = 0, 0
    for s in range(cache.num_seqs):
        a = int(cache.seq_start[s] + cache.train_from[s])
        b = int(cache.seq_start[s + 1]) - 1
        same += int((cache.argmax[a:b] == cache.tokens[a:b]).sum())
        n += max(0, b - a)
    return {"trained_positions": n, "argmax_equals_next_token": round(same / max(1, n), 4)}
