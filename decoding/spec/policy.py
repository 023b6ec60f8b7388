"""When and how much to speculate: per-request switch, tree shape, adaptive sizing.

`auto` decides from measurements on this hardware, per step: it keeps an EMA of the
step time as a function of the tokens in the pass (exact up to 16 tokens, then in steps of
8 and 32; unmeasured sizes read off the measured curve, see `_cost`) and of the
acceptance rate at each draft depth, and gives each sequence the draft depth d that
maximises expected tokens per second, (1 + sum_i prod_{j<=i} a_j) / cost(B * nodes(d)),
nodes(d) being the tokens one sequence's tree puts in the pass. A step's measured time
includes drafting the next trees (the heads' forward and their unembedding), so the
heads' own cost counts against them.
d = 0 (no drafts) is always a candidate, so speculation never costs more than plain
decoding once the estimates have settled. A depth d > 0 priced from a stale entry must
beat it by MIN_GAIN, and a pass is never priced below a smaller pass measured (stale
entries of rarely seen sizes, e.g. a 72-token pass timed at a shorter context, made large
drafts look cheap in a closed-loop chunk's shrinking tail at c=32).
Every 32nd step ONE sequence (round robin) probes, so the estimates stay fresh while
drafting is off (probing the whole batch cost up to 7 plain steps' time at 32 sequences:
0.90x at c=32): fully while drafting is on, and while it is off at the depth auto would
resume with (the best d >= 1), the pass that decides whether to resume and the cheapest
one (a full hybrid probe adds up to 5 tokens to the pass).
"""

from __future__ import annotations

from ..config import SamplingParams, SpecConfig
from .heads import DraftHeads
from .proposers import ngram_propose
from .tree import DraftTree, load_choices, tree_from_choices

MAX_TREE_NODES = 64
PROBE_EVERY = 32  # auto: every 32nd decode step one sequence drafts fully, to keep measuring
EMA = 0.1
# auto drafts on a cost entry not refreshed in the last FRESH_STEPS decode steps only where
# its estimate beats plain decoding by MIN_GAIN: such entries were measured at another
# time and context length (a 32-sequence plain step moved 217-388 ms between closed-loop
# chunks here), so marginal wins read off them are noise, and a wrong "draft" costs a whole
# batch's extra tokens. Fresh entries (batch 1 drafting, or probed) need no margin: with
# one, chat prompts at batch 1 lost their gain (0.995x against 1.10x).
MIN_GAIN = 1.10
FRESH_STEPS = 2 * PROBE_EVERY


def _size_key(n: int) -> int:
    """The pass size a step's cost is recorded under: exact where kernels change cost
    row by row, coarser above. (Power-of-two buckets mixed 33-token probe steps into the
    cost of 64-token passes, and made drafting at 32 sequences look cheap: 0.85x.)"""
    if n <= 16:
        return n
    step = 8 if n <= 128 else 32
    return (n + step - 1) // step * step


class SpeculationPolicy:
    def __init__(self, spec: SpecConfig, heads: DraftHeads | None) -> None:
        self.spec = spec
        self.heads = heads
        tree = spec.tree
        if tree in ("auto", "default"):  # auto: the engine may calibrate it (tree_autotune)
            tree = heads.default_tree if heads is not None else "chain4"
        if spec.proposer == "heads" and heads is None and spec.mode != "off":
            raise ValueError("proposer 'heads' needs draft heads (--heads PATH)")
        self.max_tree_nodes = MAX_TREE_NODES + spec.ngram_draft_len
        self.step_cost: dict[int, float] = {}  # pass size key -> EMA seconds per step
        self.cost_seen: dict[int, int] = {}  # pass size key -> observation count when last seen
        self._observed = 0  # decode-only steps observed
        self._steps = 0
        self.set_choices(load_choices(tree))

    def set_choices(self, choices: list[tuple[int, ...]]) -> None:
        """The heads' tree (choice paths); before the first step (--tree auto's pick)."""
        self.choices = choices
        self.max_depth = max(self.spec.ngram_draft_len, max(len(c) for c in choices))
        self.depth_accept = [0.5] * self.max_depth  # P(accept depth i | reached i-1)

    def enabled_for(self, params: SamplingParams) -> bool:
        if self.spec.mode == "off":
            return False
        return params.speculate is not False

    # -- measurements (fed by the engine) ------------------------------------------------
    def observe_step(self, num_tokens: int, seconds: float) -> None:
        b = _size_key(num_tokens)
        self._observed += 1
        self.cost_seen[b] = self._observed
        old = self.step_cost.get(b)
        self.step_cost[b] = seconds if old is None else (1 - EMA) * old + EMA * seconds

    def observe_acceptance(self, drafted_depth: int, accepted: int) -> None:
        for d in range(min(drafted_depth, self.max_depth)):
            hit = 1.0 if d < accepted else 0.0
            self.depth_accept[d] = (1 - EMA) * self.depth_accept[d] + EMA * hit
            if not hit:
                break  # deeper positions were not reached

    # -- decisions ---------------------------------------------------------------------
    def _cost(self, tokens: int) -> float | None:
        """Seconds for a pass of `tokens`: measured, else interpolated between the nearest
        measured sizes, else (beyond the largest) extrapolated along the measured curve's
        overall slope, so a pass never seen is priced from what was (None: nothing yet);
        never below the dearest smaller size measured (more tokens never cost less)."""
        k = _size_key(tokens)
        if not self.step_cost:
            return None
        floor = max((c for s, c in self.step_cost.items() if s < k), default=0.0)
        return max(floor, self._curve(k))

    def _curve(self, k: int) -> float:
        if k in self.step_cost:
            return self.step_cost[k]
        sizes = sorted(self.step_cost)
        lo = max((s for s in sizes if s < k), default=None)
        hi = min((s for s in sizes if s > k), default=None)
        if lo is None:
            return self.step_cost[hi]
        if hi is not None:
            w = (k - lo) / (hi - lo)
            return (1 - w) * self.step_cost[lo] + w * self.step_cost[hi]
        first, last = sizes[0], sizes[-1]
        slope = 0.0 if last == first else max(
            0.0, (self.step_cost[last] - self.step_cost[first]) / (last - first))
        return self.step_cost[last] + slope * (k - last)

    def draft_depths(self, batch_size: int, num_seqs: int) -> list[int]:
        """The draft depth of each of `num_seqs` speculating sequences in a batch of
        `batch_size`: on: full; auto: the best depth for all, except that every
        PROBE_EVERY-th step one of them (round robin) drafts fully."""
        if self.spec.mode == "on":
            return [self.max_depth] * num_seqs
        self._steps += 1
        best = self.best_depth(batch_size)
        depths = [best] * num_seqs
        if num_seqs and self._steps % PROBE_EVERY == 0:
            probe = self.max_depth if best else self.resume_depth(batch_size)
            depths[(self._steps // PROBE_EVERY) % num_seqs] = probe
        return depths

    def best_depth(self, batch_size: int) -> int:
        """The d that maximises expected tokens/s for this batch size (pass sizes never
        measured are priced by `_cost`; the periodic probe measures new ones)."""
        if not self.step_cost:
            return self.max_depth  # nothing measured yet: measure
        if _size_key(batch_size) not in self.step_cost:
            return 0  # a new batch size: its plain step is measured first, once
        rates = self._rates(batch_size)
        best_d = self._best_drafting(rates)
        return best_d if rates[best_d] > self._margin(batch_size * self.nodes(best_d)) * rates[0] else 0

    def _margin(self, tokens: int) -> float:
        """How much a draft pass of `tokens` must beat plain decoding by (see MIN_GAIN)."""
        seen = self.cost_seen.get(_size_key(tokens))
        return 1.0 if seen is not None and self._observed - seen < FRESH_STEPS else MIN_GAIN

    def resume_depth(self, batch_size: int) -> int:
        """The best d >= 1: what auto would draft if its estimates improved."""
        if _size_key(batch_size) not in self.step_cost:
            return self.max_depth
        return self._best_drafting(self._rates(batch_size))

    def _best_drafting(self, rates: list[float]) -> int:
        return max(range(1, self.max_depth + 1), key=lambda d: rates[d])  # first on ties

    def _rates(self, batch_size: int) -> list[float]:
        """Expected tokens/s of the batch for each draft depth 0..max_depth."""
        rates = [1.0 / self.step_cost[_size_key(batch_size)]]
        expected, reach = 1.0, 1.0
        for d in range(1, self.max_depth + 1):
            reach *= self.depth_accept[d - 1]
            expected += reach
            rates.append(expected / self._cost(batch_size * self.nodes(d)))
        return rates

    def nodes(self, depth: int) -> int:
        """Tokens one sequence puts in the verify pass when drafting to `depth` (at most:
        the n-gram chain may share a prefix with the heads' tree)."""
        n = 1
        if self.heads is not None and self.spec.proposer != "ngram":
            n += sum(1 for c in self.choices if len(c) <= depth)
        if self.spec.proposer in ("ngram", "hybrid"):
            n += min(depth, self.spec.ngram_draft_len)
        return min(n, 1 + self.max_tree_nodes)

    def use_heads(self, depth: int) -> bool:
        return self.heads is not None and self.spec.proposer != "ngram" and depth > 0

    def build_tree(self, token_ids: list[int], head_candidates: list[list[int]] | None,
                   depth: int) -> DraftTree | None:
        if depth <= 0:
            return None
        root = token_ids[-1]
        tree = DraftTree.root_only(root)
        if self.spec.proposer in ("ngram", "hybrid"):
            chain = ngram_propose(token_ids, self.spec.ngram_max, self.spec.ngram_min,
                                  min(depth, self.spec.ngram_draft_len))
            if chain:
                tree.add_path(chain)
        if head_candidates:
            choices = [c for c in self.choices if len(c) <= depth]
            heads_tree = tree_from_choices(root, choices, head_candidates)
            for i in range(1, len(heads_tree.tokens)):
                path = []
                j = i
                while j > 0:
                    path.append(heads_tree.tokens[j])
                    j = heads_tree.parents[j]
                tree.add_path(path[::-1])
        if tree.num_drafts == 0:
            return None
        return tree.truncated(1 + self.max_tree_nodes)
