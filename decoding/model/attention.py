"""Attention over the KV cache with explicit metadata (no globals, no model attributes).

A step packs the new tokens of all scheduled sequences into [T]. Attention needs them
per sequence, so queries are scattered into a padded [B, Lq] layout, attend to that
sequence's cache row [0, kv_len) under a boolean mask (causal prefix + tree ancestry),
and are gathered back into packed order. The metadata itself is in attention_metadata.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

# AttentionMetadata and padded_layout live in attention_metadata.py (kv_cache.py reads by
# them too); re-exported here for callers that import them with the kernels.
from .attention_metadata import AttentionMetadata, padded_layout

if TYPE_CHECKING:
    from .kv_cache import KVCache

__all__ = ["AttentionMetadata", "padded_layout", "attend", "attend_cached"]


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
