"""When and how much to speculate: per-request switch, tree shape, adaptive sizing.

`auto` shrinks trees as the batch grows: a verify pass over k extra tokens per sequence
is nearly free at batch 1 (per-pass overhead dominates) but costs real compute once the
batch is large, so the node budget per sequence falls with the number of sequences.
"""

from __future__ import annotations

from .config import SamplingParams, SpecConfig
from .heads import DraftHeads
from .proposers import ngram_propose
from .tree import DraftTree, load_choices, tree_from_choices

MAX_TREE_NODES = 64
# Total draft nodes per step across the batch in auto mode (calibrated on CPU, see
# docs/benchmarks.md); a sequence never gets fewer than 0 nor more than its tree.
AUTO_NODE_BUDGET = 32


class SpeculationPolicy:
    def __init__(self, spec: SpecConfig, heads: DraftHeads | None) -> None:
        self.spec = spec
        self.heads = heads
        tree = spec.tree
        if tree == "auto":
            tree = heads.default_tree if heads is not None else "chain4"
        self.choices = load_choices(tree)
        if spec.proposer == "heads" and heads is None and spec.mode != "off":
            raise ValueError("proposer 'heads' needs draft heads (--heads PATH)")
        self.max_tree_nodes = MAX_TREE_NODES + spec.ngram_draft_len

    def enabled_for(self, params: SamplingParams) -> bool:
        if self.spec.mode == "off":
            return False
        return params.speculate is not False

    def node_budget(self, batch_size: int) -> int:
        """Draft nodes allowed per sequence this step."""
        if self.spec.mode == "on":
            return self.max_tree_nodes
        return max(0, AUTO_NODE_BUDGET // max(1, batch_size))

    def use_heads(self, batch_size: int) -> bool:
        return self.heads is not None and self.spec.proposer != "ngram" \
            and self.node_budget(batch_size) > 0

    def build_tree(self, token_ids: list[int], head_candidates: list[list[int]] | None,
                   batch_size: int) -> DraftTree | None:
        budget = self.node_budget(batch_size)
        if budget <= 0:
            return None
        root = token_ids[-1]
        tree = DraftTree.root_only(root)
        if self.spec.proposer in ("ngram", "hybrid"):
            chain = ngram_propose(token_ids, self.spec.ngram_max, self.spec.ngram_min,
                                  self.spec.ngram_draft_len)
            if chain:
                tree.add_path(chain)
        if head_candidates:
            heads_tree = tree_from_choices(root, self.choices, head_candidates)
            for i in range(1, len(heads_tree.tokens)):
                path = []
                j = i
                while j > 0:
                    path.append(heads_tree.tokens[j])
                    j = heads_tree.parents[j]
                tree.add_path(path[::-1])
        if tree.num_drafts == 0:
            return None
        return tree.truncated(1 + budget)
