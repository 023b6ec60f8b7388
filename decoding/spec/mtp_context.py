"""Sequential MTP modules that attend over the whole context, as EAGLE and vLLM's MTP
proposer run them (DeepSeek-V3 / MiMo modules were trained this way).

Why: a module that sees only its own draft chain (mtp_sequential.py's chain mode) knows the
context solely through h_t; with its own KV cache over every earlier position it can
attend back to what it computed there, as it did in training.

The entry of the first module at position i is its block run on (h_i, embedding of
x_{i+1}): the trunk's final-normed hidden state at i and the token that followed. The
engine writes these entries as positions become committed: every prefill chunk's rows
and every step's accepted path (whose last entry, at the last accepted position p with the
bonus token, is also depth 1 of the next draft). Deeper depths chain as before, at
positions p+1, p+2, ...; they attend over the committed entries plus the chain so far, and
are overwritten by the real entries once accepted. `valid` marks committed entries only:
steps in which a sequence drafts nothing skip the module (no cost under load), and the
gaps they leave are masked out instead of read stale.

Further modules (DeepSeek checkpoints with num_nextn_predict_layers > 1) would need module
k-1's entries at every position; like vLLM's proposer they attend over their own chain
entries only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..config import ModelConfig
from ..model.attention_metadata import AttentionMetadata, padded_layout
from ..model.kv_cache import KVCache


@dataclass(slots=True)
class NewEntries:
    """One sequence's newly committed positions in a step, for its module entries."""
    slot: int
    start: int  # position of the first new entry
    rows: list[int]  # rows of the step's hidden states at positions start, start+1, ...
    tokens: list[int]  # x_{i+1} for each of those positions i
    prefill: bool = False  # prompt rows: written even when the sequence drafts nothing
    drafts: bool = False  # also draft a chain from the last entry


class ModuleContext:
    """The modules' own KV cache, one row per engine slot (the trunk's slot numbers), and
    which of its positions hold committed entries."""

    def __init__(self, cfg: ModelConfig, num_modules: int, num_slots: int, slot_len: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.kv = KVCache(dataclasses.replace(cfg, num_layers=num_modules), num_slots,
                          slot_len, dtype, device, lazy=True)
        self.valid = torch.zeros(num_slots, slot_len, dtype=torch.bool, device=device)

    @staticmethod
    def bytes_per_token(cfg: ModelConfig, num_modules: int, dtype: torch.dtype) -> int:
        return KVCache.bytes_per_token(dataclasses.replace(cfg, num_layers=num_modules), dtype) + 1

    def reset(self, slot: int) -> None:
        """The slot's sequence is gone: none of its entries may be read again."""
        self.valid[slot] = False


def _metadata(positions: torch.Tensor, slots: torch.Tensor, seq_slots: torch.Tensor,
              counts: list[int], mask: torch.Tensor) -> AttentionMetadata:
    """Packed rows (`counts` per sequence, in order) written at their own positions."""
    q_gather, q_scatter = padded_layout(counts, positions.device)
    return AttentionMetadata(
        positions=positions, token_slots=slots, token_store=positions, seq_slots=seq_slots,
        slot_start=None, kv_len=mask.shape[-1], num_seqs=len(counts), q_len=max(counts),
        q_gather=q_gather, q_scatter=q_scatter, mask=mask[:, None])


def write_and_draft(heads, hidden: torch.Tensor, model: torch.nn.Module,
                    entries: list[NewEntries], ctx: ModuleContext, depth: int
                    ) -> list[list[list[int]]]:
    """Write every entry's module-0 KV (one packed pass) and draft `depth` depths for the
    entries with `drafts`: per drafting entry, in order, per depth the top-k token ids."""
    dev = hidden.device
    counts = [len(e.rows) for e in entries]
    slots_b = torch.tensor([e.slot for e in entries], device=dev)
    starts = torch.tensor([e.start for e in entries], device=dev)
    lens = torch.tensor(counts, device=dev)
    kv_len = max(e.start + n for e, n in zip(entries, counts))
    q_len = max(counts)
    for e in entries:
        ctx.kv.ensure_initialized(e.slot, kv_len + depth)
    # Depth 1 over all new rows: committed entries before `start` (where valid) and the new
    # rows causally among themselves.
    key = torch.arange(kv_len, device=dev)
    q = torch.arange(q_len, device=dev)
    before = ctx.valid[slots_b, :kv_len] & (key[None] < starts[:, None])  # [B, kv]
    new = ((key[None, None] >= starts[:, None, None])
           & (key[None, None] <= starts[:, None, None] + q[None, :, None]))  # [B, q, kv]
    mask = before[:, None] | new
    mask[:, :, 0] |= q[None] >= lens[:, None]  # padding rows attend somewhere; dropped
    positions = torch.tensor([e.start + i for e in entries for i in range(len(e.rows))],
                             device=dev)
    row_slots = torch.repeat_interleave(slots_b, lens)
    meta = _metadata(positions, row_slots, slots_b, counts, mask)
    rows = torch.tensor([r for e in entries for r in e.rows], device=dev)
    tokens = torch.tensor([t for e in entries for t in e.tokens], device=dev)
    x, normed = heads.mods[0].advance(tokens, hidden[rows], model, meta, ctx.kv)
    ctx.valid[row_slots, positions] = True
    drafting = [b for b, e in enumerate(entries) if e.drafts]
    if not drafting or depth < 1:
        return [[] for _ in drafting]
    last_row = torch.cumsum(lens, 0)[drafting] - 1
    draft_logits = heads.draft_scorer(model)
    h = x[last_row]
    top = heads.top_tokens(heads.mods[0].logits(normed[last_row], model, draft_logits))
    tops = [top]
    # Deeper depths: one row per drafting sequence, at p + s for chain step s.
    d_slots = slots_b[drafting]
    p = (starts + lens - 1)[drafting]  # last committed position
    p_max = max(entries[b].start + counts[b] - 1 for b in drafting)  # on the host: no sync
    last_mod = len(heads.mods) - 1
    B = len(drafting)
    for s in range(1, depth):
        m = min(s, last_mod)
        kv_len_s = p_max + s + 1
        key = torch.arange(kv_len_s, device=dev)
        steps = [t for t in range(s + 1) if min(t, last_mod) == m]  # this module's chain steps
        mask = torch.zeros(B, kv_len_s, dtype=torch.bool, device=dev)
        for t in steps:
            mask |= key[None] == (p + t)[:, None]
        if m == 0:  # the first module also reads the committed entries
            mask |= ctx.valid[d_slots, :kv_len_s] & (key[None] <= p[:, None])
        meta = _metadata(p + s, d_slots, d_slots, [1] * B, mask[:, None])
        h, normed = heads.mods[m].advance(tops[-1][:, 0], h, model, meta, ctx.kv)
        tops.append(heads.top_tokens(heads.mods[m].logits(normed, model, draft_logits)))
    return torch.stack(tops, dim=1).tolist()  # one host sync: [B][depth][k]


def draft_timer(heads, model: torch.nn.Module, ctx: ModuleContext, context: int = 300,
                new_rows: int = 2, slot: int = 0):
    """For timing (bench --calibrate-tree, benchmarks/draft_cost.py): a callable that does
    what one decode step's drafting does for one sequence at `context` committed positions
    with `new_rows` accepted rows: write their entries, then draft `depth` depths. Uses
    `slot` of an idle engine's context; call `ctx.reset(slot)` afterwards."""
    p = next(model.parameters())
    hidden = torch.randn(context + new_rows, model.config.hidden_size, device=p.device,
                         dtype=p.dtype)
    with torch.inference_mode():
        write_and_draft(heads, hidden, model,
                        [NewEntries(slot, 0, list(range(context)), [5] * context, prefill=True)],
                        ctx, 0)
    step = [NewEntries(slot, context, list(range(context, context + new_rows)), [5] * new_rows,
                       drafts=True)]
    return lambda depth: write_and_draft(heads, hidden, model, step, ctx, depth)
