"""Prepare: the host-side inputs of one packed forward.

A step feeds prefill chunks and draft trees of many sequences through the model in ONE pass.
This module packs their token ids, positions and cache rows into flat tensors (one transfer
each), builds the attention metadata (padded query layout, per-sequence masks over the
committed prefix and the item's own tokens) and splits the step into attention groups. It
only reads the batch and the cache layout; it commits nothing, so a failing forward leaves
every sequence as it was.
"""

from __future__ import annotations

import torch

from ..model.attention_metadata import AttentionMetadata, padded_layout
from ..model.kv_cache import KVCache
from .scheduler import ScheduledSeq


def attention_groups(batch: list[ScheduledSeq]) -> list[list[int]]:
    """Indices of `batch` attended together: every prefill chunk of 2+ tokens alone, the
    rest (decodes, draft trees, one-token chunks) as one padded batch. One group = no split."""
    chunks = [[i] for i, b in enumerate(batch) if b.tree is None and len(b.tokens) > 1]
    rest = [i for i, b in enumerate(batch) if not (b.tree is None and len(b.tokens) > 1)]
    return chunks + ([rest] if rest else [])


def _is_chunk(item: ScheduledSeq) -> bool:
    """A prefill chunk of 2+ tokens: attention_groups gives it a group of its own."""
    return item.tree is None and len(item.tokens) > 1


class StepInputs:
    """Builds (token ids, attention metadata, logit rows) for a scheduled batch."""

    def __init__(self, kv: KVCache, device: torch.device) -> None:
        self.kv = kv
        self.device = device

    def prepare(self, batch: list[ScheduledSeq]
                ) -> tuple[torch.Tensor, AttentionMetadata, torch.Tensor]:
        """Host-side metadata for one packed forward (one transfer per tensor). Logit rows:
        every node of a draft tree, the last row of a chunk that ends its prompt."""
        ids: list[int] = []
        positions: list[int] = []
        tslots: list[int] = []
        tstore: list[int] = []
        logit_rows: list[int] = []
        masks: list[torch.Tensor] = []  # per item: [n, n] mask over its own new tokens
        for item in batch:
            seq, n, start = item.seq, len(item.tokens), item.seq.num_cached
            base = len(ids)
            ids.extend(item.tokens)
            tslots.extend([seq.slot] * n)
            tstore.extend(range(start, start + n))
            if item.tree is not None:
                positions.extend(start + d for d in item.tree.depths)
                masks.append(item.tree.ancestor_mask())
                logit_rows.extend(range(base, base + n))
            else:
                positions.extend(range(start, start + n))
                masks.append(torch.ones(n, n, dtype=torch.bool).tril_())
                if item.needs_logits:
                    logit_rows.append(base + n - 1)
        kv_len = max(b.seq.num_cached + len(b.tokens) for b in batch)
        for item in batch:
            self.kv.ensure_initialized(item.seq.slot, kv_len)
        as_t = lambda xs: torch.tensor(xs, dtype=torch.long, device=self.device)  # noqa: E731
        groups = attention_groups(batch)
        # one group: the step's own layout; several: each group's, the step's left unpadded
        meta = self.attention_meta(batch, masks, layout=len(groups) == 1)
        meta.chunk = len(groups) == 1 and _is_chunk(batch[groups[0][0]])
        meta.positions, meta.token_slots, meta.token_store = (as_t(positions), as_t(tslots),
                                                              as_t(tstore))
        if len(groups) > 1:
            bases = [0]
            for item in batch:
                bases.append(bases[-1] + len(item.tokens))
            meta.groups = []
            for members in groups:
                g = self.attention_meta([batch[i] for i in members], [masks[i] for i in members])
                g.chunk = _is_chunk(batch[members[0]])
                g.rows = as_t([r for i in members for r in range(bases[i], bases[i + 1])])
                meta.groups.append(g)
        return as_t(ids), meta, as_t(logit_rows)

    def attention_meta(self, items: list[ScheduledSeq], masks: list[torch.Tensor],
                       layout: bool = True) -> AttentionMetadata:
        """What attention needs for these sequences (in slot order): their cache rows, the
        padded query layout and the mask (committed prefix + each item's own mask); without
        `layout` only the cache rows (a step that attends in groups)."""
        B = len(items)
        counts = [len(b.tokens) for b in items]
        q_len = max(counts)
        kv_len = max(b.seq.num_cached + len(b.tokens) for b in items)
        mask = None
        if layout and (B > 1 or q_len > 1):
            mask = torch.zeros(B, 1, q_len, kv_len, dtype=torch.bool)
            for b, (item, own) in enumerate(zip(items, masks)):
                n, start = counts[b], item.seq.num_cached
                mask[b, 0, :n, :start] = True
                mask[b, 0, :n, start:start + n] = own
                mask[b, 0, n:, 0] = True  # padding rows: attend somewhere, result dropped
        dev = self.device
        slots = [item.seq.slot for item in items]
        contiguous = slots == list(range(slots[0], slots[0] + B))
        q_gather, q_scatter = padded_layout(counts, dev) if layout else (None, None)
        empty = torch.empty(0, dtype=torch.long, device=dev)
        return AttentionMetadata(
            positions=empty, token_slots=empty, token_store=empty,  # the step's: see prepare
            seq_slots=torch.tensor(slots, dtype=torch.long, device=dev),
            slot_start=slots[0] if contiguous else None,
            kv_len=kv_len,
            num_seqs=B,
            q_len=q_len,
            q_gather=q_gather,
            q_scatter=q_scatter,
            mask=None if mask is None else mask.to(dev),
        )
