"""Sequence state and the scheduler: waiting / running queues, admission, step composition."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import Enum

import torch

from ..config import AcceptanceRule, SamplingParams
from ..model.detokenizer import IncrementalDetokenizer
from ..spec.tree import DraftTree
from .outputs import SpecStats
from .stop import StopStringMatcher


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    request_id: str
    prompt_len: int
    token_ids: list[int]  # prompt + emitted output
    params: SamplingParams
    rule: AcceptanceRule
    speculate: bool
    detok: IncrementalDetokenizer
    stops: StopStringMatcher | None
    generator: torch.Generator | None
    status: Status = Status.WAITING
    slot: int | None = None
    num_cached: int = 0  # tokens whose K/V are committed in the cache
    num_emitted: int = 0  # output tokens sent to the client (stops at the stop point)
    spec: SpecStats = field(default_factory=SpecStats)
    draft: DraftTree | None = None  # the tree verified by the next step
    head_candidates: list[list[int]] | None = None  # per depth top-k from draft heads

    @property
    def in_prefill(self) -> bool:
        return self.num_cached < self.prompt_len

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    tokens: list[int]  # new tokens fed this step
    tree: DraftTree | None  # decode: the verified tree (tokens == tree.tokens)
    needs_logits: bool  # prefill chunk that ends the prompt, or any decode


class Scheduler:
    """FIFO admission into fixed cache slots; prefill chunked under a per-step token budget."""

    def __init__(self, max_num_seqs: int, prefill_chunk: int, max_tokens_per_step: int,
                 prefill_while_decoding: int | None = None) -> None:
        self.max_num_seqs = max_num_seqs
        self.prefill_chunk = prefill_chunk
        self.max_tokens_per_step = max_tokens_per_step
        # prompt tokens a step may add while sequences decode (None: the whole budget): a
        # burst of prompts then delays running streams by this many tokens' cost per step
        self.prefill_while_decoding = prefill_while_decoding
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def admit(self, allocate_slot) -> None:
        while self.waiting and len(self.running) < self.max_num_seqs:
            slot = allocate_slot()
            if slot is None:
                return
            seq = self.waiting.popleft()
            seq.slot = slot
            seq.status = Status.RUNNING
            self.running.append(seq)

    def schedule(self) -> list[ScheduledSeq]:
        """Decodes first (they are latency-critical), then prefill chunks in arrival order."""
        budget = self.max_tokens_per_step
        out: list[ScheduledSeq] = []
        for seq in self.running:
            if seq.in_prefill:
                continue
            tree = seq.draft or DraftTree.root_only(seq.token_ids[-1])
            if len(tree.tokens) > budget:
                tree = tree.truncated(max(1, budget))
            budget -= len(tree.tokens)
            out.append(ScheduledSeq(seq, tree.tokens, tree, True))
        if out and self.prefill_while_decoding is not None:
            budget = min(budget, self.prefill_while_decoding)
        for seq in self.running:
            if not seq.in_prefill or budget <= 0:
                continue
            n = min(seq.prompt_len - seq.num_cached, self.prefill_chunk, budget)
            budget -= n
            chunk = seq.token_ids[seq.num_cached:seq.num_cached + n]
            out.append(ScheduledSeq(seq, chunk, None, seq.num_cached + n == seq.prompt_len))
        out.sort(key=lambda s: s.seq.slot)  # contiguous slots let attention read a view
        return out
