"""Draft: the trees the next step verifies, built from this step's forward.

After a step has committed and emitted, every sequence still running and speculating gets
its next draft tree: the policy picks its depth (auto mode probes and backs off), draft
heads propose from the hidden row of its last accepted token (or, for checkpoint modules
that attend over the context, from their own per-slot cache, written here for every newly
committed position), and prompt lookup (n-gram) fills in where configured. The trees wait
on `Sequence.draft` for the scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..model.trunk import CausalLM
from ..spec.heads import DraftHeads
from ..spec.mtp_context import ModuleContext, NewEntries, write_and_draft
from ..spec.policy import SpeculationPolicy
from .scheduler import Scheduler, Sequence


@dataclass(slots=True)
class DraftBatch:
    """What drafting needs from a step, gathered as its sequences commit (batch order)."""

    context: bool  # context-attending modules: collect each sequence's new module entries
    seqs: list[Sequence] = field(default_factory=list)  # still running after emitting
    rows: list[int] = field(default_factory=list)  # hidden row of each one's last accepted node
    committed: dict[int, NewEntries] = field(default_factory=dict)  # id(seq) -> module entries

    def add_chunk(self, seq: Sequence, start: int, offset: int, n: int) -> None:
        """A prefill chunk mid-prompt (fed at hidden rows offset.., positions start..)."""
        if self.context and seq.speculate:
            self.committed[id(seq)] = NewEntries(seq.slot, start, list(range(offset, offset + n)),
                                                 seq.token_ids[start + 1:start + n + 1],
                                                 prefill=True)

    def add(self, seq: Sequence, start: int, offset: int, n: int, path: list[int],
            prefill: bool) -> None:
        """A sequence that goes on: its prompt just ended (`prefill`) or its tree was
        verified with `path` accepted; its `n` tokens were fed at hidden rows offset..."""
        self.rows.append(offset + (n - 1 if prefill else path[-1]))
        self.seqs.append(seq)
        if self.context and seq.speculate:
            nodes = list(range(n)) if prefill else path  # now committed
            self.committed[id(seq)] = NewEntries(
                seq.slot, start, [offset + j for j in nodes],
                seq.token_ids[start + 1:start + len(nodes) + 1], prefill=prefill)


class Drafter:
    """Builds each speculating sequence's next tree: heads, context modules, prompt lookup."""

    def __init__(self, policy: SpeculationPolicy, heads: DraftHeads | None, model: CausalLM,
                 module_ctx: ModuleContext | None, scheduler: Scheduler) -> None:
        self.policy = policy
        self.heads = heads
        self.model = model
        self.module_ctx = module_ctx
        self.scheduler = scheduler

    def new_batch(self) -> DraftBatch:
        return DraftBatch(context=self.module_ctx is not None)

    def draft_next(self, batch: DraftBatch, hidden: torch.Tensor) -> None:
        """Build each speculating sequence's tree for the next step. hidden: the rows the
        heads draft from (the final hidden states, or Meta-style heads' block outputs)."""
        seqs, rows, committed = batch.seqs, batch.rows, batch.committed
        spec_seqs = [s for s in seqs if s.speculate]
        depths = self.policy.draft_depths(len(self.scheduler.running), len(spec_seqs)) if seqs else []
        # Heads run only for the sequences that draft this step (often one probe, or none).
        with_heads = [(s, d) for s, d in zip(spec_seqs, depths) if self.policy.use_heads(d)]
        head_cands: dict[int, list[list[int]]] = {}
        # depths the heads must draft: as deep as the deepest tree of this step reads
        needed = min(max((d for _, d in with_heads), default=0),
                     max(len(c) for c in self.policy.choices))
        if self.module_ctx is not None:
            head_cands = self._draft_in_context(hidden, with_heads, committed, needed)
        elif self.heads is not None and with_heads:
            hs = [s for s, _ in with_heads]
            idx = torch.tensor([rows[seqs.index(s)] for s in hs], device=hidden.device)
            cands = self.heads.candidates(
                hidden[idx], self.model, [s.token_ids[-1] for s in hs], needed,
                positions=[s.num_cached - 1 for s in hs])  # last accepted token's
            head_cands = {id(s): c for s, c in zip(hs, cands)}
        for seq, depth in zip(spec_seqs, depths):
            seq.draft = self.policy.build_tree(seq.token_ids, head_cands.get(id(seq)), depth)

    def _draft_in_context(self, hidden: torch.Tensor, with_heads: list[tuple[Sequence, int]],
                          committed: dict[int, NewEntries], needed: int
                          ) -> dict[int, list[list[int]]]:
        """Context-attending modules: write the module entries of every prefill chunk and of
        every drafting sequence's accepted path, and draft for the latter, in one call.
        Sequences that draft nothing this step skip their entries (see mtp_context.py)."""
        for s, _ in with_heads:
            committed[id(s)].drafts = True
        entries = [e for e in committed.values() if e.drafts or e.prefill]
        if not entries:
            return {}
        cands = write_and_draft(self.heads, hidden, self.model, entries, self.module_ctx, needed)
        by_entry = {id(e): c for e, c in zip([e for e in entries if e.drafts], cands)}
        return {id(s): by_entry[id(committed[id(s)])] for s, _ in with_heads}
