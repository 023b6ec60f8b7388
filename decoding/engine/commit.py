"""Accept and commit: what a step's forward decided for one sequence.

The forward wrote K/V for every fed token, drafted ones included. This module turns that
into committed state: a prefill chunk's entries count as cached; at the end of a prompt the
first output token is sampled; a verified draft tree goes through the request's acceptance
rule (greedy, typical or rejection), the accepted path's K/V are moved into place (the
rejected nodes are dropped) and the speculation statistics and the auto policy learn the
outcome. It emits nothing: the tokens go to `output_processor.OutputProcessor`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import SpecConfig
from ..model.kv_cache import KVCache
from ..spec.acceptance import (Accepted, accept_greedy, accept_greedy_ids, accept_rejection,
                               accept_typical)
from ..spec.policy import SpeculationPolicy
from ..spec.sampling import apply_penalties, processed_probs, sample
from ..spec.tree import DraftTree
from .scheduler import ScheduledSeq, Sequence


@dataclass(slots=True)
class Verdict:
    """One sequence's outcome of a step, before emitting."""

    tokens: list[int]  # new tokens in order: the accepted drafts, then the bonus token
    path: list[int]  # accepted tree nodes, root first; row path[i] predicted tokens[i]
    logits: torch.Tensor  # the rows scored (penalties applied), for logprobs


class Committer:
    """Runs the acceptance rule over a sequence's logits rows and commits the KV it keeps."""

    def __init__(self, kv: KVCache, policy: SpeculationPolicy, spec: SpecConfig) -> None:
        self.kv = kv
        self.policy = policy
        self.spec = spec

    @staticmethod
    def commit_chunk(item: ScheduledSeq) -> None:
        """A prefill chunk mid-prompt: the K/V the forward wrote for it are committed."""
        item.seq.num_cached += len(item.tokens)

    def accept(self, item: ScheduledSeq, logits: torch.Tensor,
               argmax: list[int] | None = None) -> Verdict:
        """Accept (decode) or sample the first token (prefill end); commit KV. `logits`:
        one row per tree node (decode), or the prompt's last row (prefill end); `argmax`:
        their argmax if the caller has it (greedy then needs no pass over the logits)."""
        seq, params = item.seq, item.seq.params
        tree = item.tree
        if tree is None:  # last prefill chunk: its final row predicts the first output token
            seq.num_cached += len(item.tokens)
            tree = DraftTree.root_only(seq.token_ids[-1])
        else:
            seq.draft = None
        if seq.output_ids and (params.presence_penalty or params.frequency_penalty):
            out_ids = torch.tensor(seq.output_ids, device=logits.device)
            logits = apply_penalties(logits, out_ids, params)
            argmax = None  # of the logits before the penalties
        acc = self.accept_rule(seq, logits, tree, argmax)
        if item.tree is not None:
            self._commit_path(seq, tree, acc)
        tokens = [tree.tokens[j] for j in acc.path[1:]] + [acc.bonus]
        return Verdict(tokens, acc.path, logits)

    def _commit_path(self, seq: Sequence, tree: DraftTree, acc: Accepted) -> None:
        """KV commit: keep the accepted nodes' entries, compacted after the prefix; record
        the step in the request's statistics and (if it drafted) the policy's."""
        start = seq.num_cached
        self.kv.keep_path(seq.slot, [start + j for j in acc.path], start)
        seq.num_cached += len(acc.path)
        seq.spec.record_step(tree.max_depth, tree.num_drafts, acc.num_accepted)
        if tree.num_drafts:
            self.policy.observe_acceptance(tree.max_depth, acc.num_accepted)

    def accept_rule(self, seq: Sequence, logits: torch.Tensor, tree: DraftTree,
                    argmax: list[int] | None = None) -> Accepted:
        """The request's acceptance rule over `tree` (a root-only tree: plain sampling);
        `argmax`: the logits rows' argmax, where known."""
        p = seq.params
        if p.greedy:
            return accept_greedy_ids(argmax, tree) if argmax else accept_greedy(logits, tree)
        probs = processed_probs(logits, p)
        if tree.num_drafts == 0:
            return Accepted([0], int(sample(probs[0], seq.generator).item()))
        if seq.rule == "rejection":
            return accept_rejection(probs, tree, seq.generator)
        eps = p.typical_epsilon if p.typical_epsilon is not None else self.spec.typical_epsilon
        delta = p.typical_delta if p.typical_delta is not None else self.spec.typical_delta
        return accept_typical(probs, tree, eps, delta, seq.generator)
