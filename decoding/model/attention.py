"""Attention over the KV cache with explicit metadata (no globals, no model attributes).

A step packs the new tokens of all scheduled sequences into [T]. Attention needs them
per sequence, so queries are scattered into a padded [B, Lq] layout, attend to that
sequence's cache row [0, kv_len) under a boolean mask (causal prefix + tree ancestry),
and are gathered back into packed order. The metadata itself is in attention_metadata.py.

`attend_invariant` is the batch-invariant path (EngineConfig.batch_invariant): each query
row gathers its own keys in LOGICAL order (committed prefix, then its tree ancestors) into
aligned blocks of INVARIANT_BLOCK keys, so a row's reduction is the same whether it is a
decode row, a node of a draft tree (siblings between its ancestors in the cache) or a row
beside longer sequences (padded keys). Every matmul has one fixed shape per entry
([G, D] @ [D, C] for scores, [G, C] @ [C, D] for values, G query heads per KV head), which
bmm computes the same whatever the batch count; block sums are combined in a fixed pairwise
tree over a power-of-two number of blocks, where the zero blocks past a row's length (and
the zero weights of its padded keys) leave every partial sum as it was.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

# AttentionMetadata and padded_layout live in attention_metadata.py (kv_cache.py reads by
# them too); re-exported here for callers that import them with the kernels.
from .attention_metadata import AttentionMetadata, padded_layout
from .row_attention import attend_rows, write_attend_rows

if TYPE_CHECKING:
    from .kv_cache import KVCache

__all__ = ["AttentionMetadata", "padded_layout", "attend", "attend_cached", "attend_invariant"]

INVARIANT_BLOCK = 32  # keys per block in attend_invariant: fixed, whatever the pass


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
           scale: float) -> torch.Tensor:
    """q: [T, Hq, D]; k, v: [B, Hkv, kv_len, D] -> [T, Hq, D] in q's dtype; computed in
    the cache's dtype, or fp32 over an fp16 cache on CPU (device.kv_cache_dtype)."""
    out_dtype = q.dtype
    if k.dtype == torch.float16 and k.device.type == "cpu":  # CPU SDPA is slow in fp16
        k, v = k.float(), v.float()
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


def write_and_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: KVCache,
                     layer: int, meta: AttentionMetadata, scale: float, invariant: bool = False,
                     rows: bool = False) -> torch.Tensor:
    """Write the step's k/v [T, Hkv, D] into `layer` of the cache, then attend_cached. A
    step of decode/tree rows alone through the row kernel does both in one call."""
    if rows and meta.rows_alone:
        return write_attend_rows(q, k, v, kv, layer, meta, scale)
    kv.write(layer, meta, k, v)
    return attend_cached(q, kv, layer, meta, scale, invariant, rows)


def attend_cached(q: torch.Tensor, kv: KVCache, layer: int, meta: AttentionMetadata,
                  scale: float, invariant: bool = False, rows: bool = False) -> torch.Tensor:
    """q: [T, Hq, D] -> [T, Hq, D], attending over `layer` of the cache, group by group
    where the step has groups. rows (the row kernel loaded, row_attention.resolve): every
    group but a prefill chunk's through row_attention.attend_rows, which is batch-invariant
    by construction, whatever `invariant` says. Else invariant: those groups through
    attend_invariant. A prefill chunk's rows depend only on the chunk: SDPA always."""
    if meta.groups is None:
        if meta.chunk or not (rows or invariant):
            return attend(q, kv.keys(layer, meta), kv.values(layer, meta), meta, scale)
        if rows:
            return attend_rows(q, kv, layer, meta, scale)
        return attend_invariant(q, kv, layer, meta, scale)
    out = torch.empty_like(q)
    for g in meta.groups:
        if g.chunk or not (rows or invariant):
            out[g.rows] = attend(q[g.rows], kv.keys(layer, g), kv.values(layer, g), g, scale)
        elif rows:
            out[g.rows] = attend_rows(q[g.rows], kv, layer, g, scale)
        else:
            out[g.rows] = attend_invariant(q[g.rows], kv, layer, g, scale)
    return out


def invariant_keys(meta: AttentionMetadata, rows: int, device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Per packed row: (cache slot [T], cache index of its logical key j [T, P], j is a real
    key [T, P], blocks nb) with P = nb * INVARIANT_BLOCK. A row's keys are the True entries
    of its mask row in cache order, which is logical order (committed prefix, then its
    ancestors, parents before children); padded entries point at index 0 (finite)."""
    C = INVARIANT_BLOCK
    if meta.mask is None:  # one sequence, one row: keys [0, kv_len)
        visible = torch.ones(rows, meta.kv_len, dtype=torch.bool, device=device)
        seq = torch.zeros(rows, dtype=torch.long, device=device)
    else:
        lq = meta.q_len
        padded = (meta.q_scatter if meta.q_scatter is not None
                  else torch.arange(rows, device=device))
        seq = padded // lq
        visible = meta.mask.reshape(meta.num_seqs * lq, meta.kv_len)[padded]
    count = visible.sum(-1)
    nb = max(1, -(-int(count.max()) // C))
    P = nb * C
    target = torch.where(visible, visible.cumsum(-1) - 1, P)
    idx = torch.zeros(rows, P + 1, dtype=torch.long, device=device)
    idx.scatter_(1, target, torch.arange(meta.kv_len, device=device).expand(rows, -1))
    valid = torch.arange(P, device=device) < count[:, None]
    return meta.seq_slots[seq], idx[:, :P], valid, nb


def invariant_layout(meta: AttentionMetadata, kv: KVCache, rows: int, device: torch.device
                     ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """What attend_invariant needs for every layer of a step, built at its first layer:
    (the rows of the cache holding each row's keys and values, kv.flat_index [2, T, Hkv, P];
    the padded key positions [T, 1, nb, 1, C] as a mask of the scores; nb)."""
    slots, idx, valid, nb = invariant_keys(meta, rows, device)
    invalid = (~valid).view(rows, 1, nb, 1, INVARIANT_BLOCK)
    return kv.flat_index(slots, idx), invalid, nb


def attend_invariant(q: torch.Tensor, kv: KVCache, layer: int, meta: AttentionMetadata,
                     scale: float) -> torch.Tensor:
    """q: [T, Hq, D] -> [T, Hq, D]: each row's attention computed the same whatever else
    is in the pass (module docstring). Costs a copy of each row's keys and values (one
    index_select for both); the step's layout and masks are built once, at the first
    layer, and the elementwise steps run in place (docs/experiments.md)."""
    out_dtype = q.dtype
    T, Hq, D = q.shape
    if meta.invariant_layout is None:
        meta.invariant_layout = invariant_layout(meta, kv, T, q.device)
    flat, invalid, nb = meta.invariant_layout
    C = INVARIANT_BLOCK
    kvr = kv.gather_flat(layer, flat)  # [2, T, Hkv, P, D]
    if kvr.dtype == torch.float16 and kvr.device.type == "cpu":  # fp32 arithmetic, as attend
        kvr = kvr.float()
    Hkv = kvr.shape[2]
    G = Hq // Hkv
    N = T * Hkv * nb  # bmm entries: one per (row, KV head, block)
    kvr = kvr.view(2, N, C, D)
    qs = (q.to(kvr.dtype) * scale).view(T * Hkv, 1, G, D).expand(T * Hkv, nb, G, D)
    s = torch.bmm(qs.reshape(N, G, D), kvr[0].transpose(1, 2)).view(T, Hkv, nb, G, C)
    s.masked_fill_(invalid, float("-inf"))
    p = s.sub_(s.amax(dim=(2, 4), keepdim=True)).exp_()
    o = torch.bmm(p.view(N, G, C), kvr[1]).view(T, Hkv, nb, G, D)
    acc = torch.cat([o, p.sum(-1, keepdim=True)], -1)  # + the softmax denominator's part
    width = 1 << (nb - 1).bit_length()
    if width > nb:
        acc = torch.cat([acc, acc.new_zeros(T, Hkv, width - nb, G, D + 1)], 2)
    while width > 1:  # fixed pairwise tree over the blocks: block 2i + block 2i+1
        width //= 2
        a, b = acc.view(T, Hkv, width, 2, G, D + 1).unbind(3)
        acc = a + b
    acc = acc.view(T, Hq, D + 1)
    return (acc[..., :D] / acc[..., D:]).to(out_dtype)
