"""Attention over the KV cache with explicit metadata (no globals, no model attributes).

A step packs the new tokens of all scheduled sequences into [T]. Attention needs them
per sequence, so queries are scattered into a padded [B, Lq] layout, attend to that
sequence's cache row [0, kv_len) under a boolean mask (causal prefix + tree ancestry),
and are gathered back into packed order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .kv_cache import KVCache


@dataclass(slots=True)
class AttentionMetadata:
    positions: torch.Tensor  # [T] int64 rotary position of each new token
    token_slots: torch.Tensor  # [T] int64 cache slot (sequence row) of each new token
    token_store: torch.Tensor  # [T] int64 cache index the token's K/V are written to
    seq_slots: torch.Tensor  # [B] int64 cache slot of each scheduled sequence
    slot_start: int | None  # seq_slots == arange(slot_start, slot_start + B): slice, no copy
    kv_len: int  # keys read per sequence: [0, kv_len)
    num_seqs: int  # B
    q_len: int  # Lq: padded queries per sequence
    q_gather: torch.Tensor | None  # [B*Lq] index into packed tokens (T = pad row); None if B == 1
    q_scatter: torch.Tensor | None  # [T] padded index of each packed token; None if B == 1
    mask: torch.Tensor | None  # [B, 1, Lq, kv_len] bool, True = may attend; None = all
    # A step mixing a prefill chunk with decoding sequences attends in groups: padding
    # every decoding sequence's queries to the chunk's length would cost B x chunk rows.
    # Each group describes its own sequences (the fields above, minus positions/store,
    # which stay the step's) and `rows`, its packed rows in the step.
    groups: list[AttentionMetadata] | None = None
    rows: torch.Tensor | None = None  # [T_g] (groups only)


def padded_layout(counts: list[int], device: torch.device | str = "cpu"
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(q_gather, q_scatter) for packed rows, `counts[b]` of them for sequence b in order,
    padded to max(counts) per sequence (the pad rows gather row T, a zero row); (None, None)
    for one sequence, which needs no padding."""
    if len(counts) == 1:
        return None, None
    q_len, T = max(counts), sum(counts)
    gather, scatter, base = [], [], 0
    for b, n in enumerate(counts):
        gather += list(range(base, base + n)) + [T] * (q_len - n)
        scatter += range(b * q_len, b * q_len + n)
        base += n
    as_t = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
    return as_t(gather), as_t(scatter)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
           scale: float) -> torch.Tensor:
    """q: [T, Hq, D]; k, v: [B, Hkv, kv_len, D] -> [T, Hq, D] in q's dtype; computed in
    the cache's dtype (fp32 on CPU, see device.kv_cache_dtype)."""
    out_dtype = q.dtype
    q = q.to(k.dtype)
    T, Hq, D = q.shape
    B, Lq = meta.num_seqs, meta.q_len
    if meta.q_gather is None:
        qp = q.view(1, T, Hq, D).transpose(1, 2)
    else:
        padded = torch.cat([q, q.new_zeros(1, Hq, D)], 0)[meta.q_gather]
        qp = padded.view(B, Lq, Hq, D).transpose(1, 2)
    out = F.scaled_dot_product_attention(qp, k, v, attn_mask=meta.mask, scale=scale,
                                         enable_gqa=k.shape[1] != Hq)
    out = out.transpose(1, 2).reshape(B * Lq, Hq, D)
    if meta.q_scatter is not None:
        out = out[meta.q_scatter]
    return out.to(out_dtype)


def attend_cached(q: torch.Tensor, kv: KVCache, layer: int, meta: AttentionMetadata,
                  scale: float) -> torch.Tensor:
    """q: [T, Hq, D] -> [T, Hq, D], attending over `layer` of the cache, group by group
    where the step has groups."""
    if meta.groups is None:
        return attend(q, kv.keys(layer, meta), kv.values(layer, meta), meta, scale)
    out = torch.empty_like(q)
    for g in meta.groups:
        out[g.rows] = attend(q[g.rows], kv.keys(layer, g), kv.values(layer, g), g, scale)
    return out
