"""What one step tells attention about its packed tokens: `AttentionMetadata` and the
padded per-sequence layout (`padded_layout`).

Its own module so that both the attention kernels (attention.py) and the KV cache
(kv_cache.py), which read and write by this metadata, can import it without importing
each other: attention -> kv_cache -> attention_metadata, never back.

A step packs the new tokens of all scheduled sequences into [T]; attention scatters them
into a padded [B, Lq] layout per sequence and gathers them back (attention.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
    # True for a prefill chunk attended alone (step_inputs): the batch-invariant mode keeps
    # SDPA for it (a chunk's rows depend only on the chunk), every other row goes through
    # attention.attend_invariant.
    chunk: bool = False
    # attend_invariant's per-row key layout, built at the first layer and reused by the rest
    invariant_layout: tuple | None = None
    # row_attention.attend_rows' per-row keys (row_layout), built at the first layer likewise
    row_layout: tuple | None = None

    @property
    def rows_alone(self) -> bool:
        """Decode and tree rows only (no prefill chunk, no groups): the step the row kernel
        writes and attends in one call per layer (attention.write_and_attend, and the
        compiled graph's C++ op, step_attention.step_context)."""
        return self.groups is None and not self.chunk


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
