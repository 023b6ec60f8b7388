"""Pure tests of acceptance.py and tree.py on tiny hand-built tensors.

Invariant 4: rejection sampling leaves the base distribution unchanged (chi-square over
fixed-seed samples, vocab 6, depth 1 with 1-3 point-mass candidates and depth 2 with
conditionals that depend on the first token); typical acceptance at temperature -> 0 is greedy.
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from mtpserve.decoding.spec.acceptance import (accept_greedy, accept_rejection, accept_typical,
                                          typical_threshold)
from mtpserve.decoding.spec.tree import PRESETS, DraftTree, load_choices, tree_from_choices

V = 6


def one_hot_logits(argmaxes: list[int], vocab: int = 8) -> torch.Tensor:
    """[n, vocab] logits whose row i has its maximum at argmaxes[i]."""
    logits = torch.zeros(len(argmaxes), vocab)
    for i, a in enumerate(argmaxes):
        logits[i, a] = 5.0
    return logits


def tree_of(edges: list[tuple[int, int]], root: int = 0) -> DraftTree:
    """edges: (parent node, token) for nodes 1.. in order."""
    return DraftTree([root] + [t for _, t in edges], [-1] + [p for p, _ in edges])


# -- greedy -----------------------------------------------------------------------------------
def test_greedy_chain_accepts_matching_prefix_and_bonus():
    tree = tree_of([(0, 3), (1, 5), (2, 1)])
    acc = accept_greedy(one_hot_logits([3, 5, 4, 7]), tree)
    assert acc.path == [0, 1, 2] and acc.bonus == 4 and acc.num_accepted == 2


def test_greedy_all_accepted_bonus_from_last_node():
    tree = tree_of([(0, 3), (1, 5)])
    acc = accept_greedy(one_hot_logits([3, 5, 6]), tree)
    assert acc.path == [0, 1, 2] and acc.bonus == 6


def test_greedy_nothing_accepted_bonus_is_root_argmax():
    tree = tree_of([(0, 3), (1, 5)])
    acc = accept_greedy(one_hot_logits([2, 5, 6]), tree)
    assert acc.path == [0] and acc.bonus == 2


def test_greedy_branching_tree_follows_the_argmax_branch():
    # nodes: 1 (tok 2), 2 (tok 3), 3 (tok 4, under 1), 4 (tok 5, under 2),
    #        5 (tok 6, under 2), 6 (tok 7, under 5)
    tree = tree_of([(0, 2), (0, 3), (1, 4), (2, 5), (2, 6), (5, 7)])
    # The first branch (node 1) is deeper-looking but wrong: root argmax is 3 -> node 2,
    # node 2's argmax 6 -> node 5 (the second sibling), node 5's argmax 7 -> node 6.
    argmax = [3, 4, 6, 0, 0, 7, 1]
    acc = accept_greedy(one_hot_logits(argmax), tree)
    assert acc.path == [0, 2, 5, 6] and acc.bonus == 1


# -- typical ----------------------------------------------------------------------------------
def _random_tree(rng: random.Random, logits: torch.Tensor, n: int) -> DraftTree:
    """Random tree whose drafts often equal the parent's argmax (so paths get accepted)."""
    tree = DraftTree.root_only(rng.randrange(V))
    argmax = logits.argmax(-1).tolist()
    while len(tree.tokens) < n:
        parent = rng.randrange(len(tree.tokens))
        tok = argmax[parent] if rng.random() < 0.6 else rng.randrange(V)
        tree.add_path([tok], start=parent)
    return tree


def test_typical_at_near_zero_temperature_is_greedy():
    rng = random.Random(0)
    g = torch.Generator().manual_seed(0)
    accepted_any = 0
    for trial in range(200):
        n = rng.randrange(1, 12)
        logits = torch.randn(12, V, generator=g, dtype=torch.float64)
        tree = _random_tree(rng, logits, n)
        logits = logits[:len(tree.tokens)]
        probs = torch.softmax(logits / 1e-4, dim=-1)
        greedy = accept_greedy(logits, tree)
        typical = accept_typical(probs, tree, 0.09, 0.3, torch.Generator().manual_seed(trial))
        assert typical.path == greedy.path, (trial, tree)
        assert typical.bonus == greedy.bonus, (trial, tree)
        accepted_any += greedy.num_accepted > 0
    assert accepted_any > 50  # the trees did exercise accepted paths


def _entropy(p: list[float]) -> float:
    return -sum(x * math.log(x) for x in p if x > 0)


def test_typical_threshold_formula():
    rows = [[0.5, 0.3, 0.15, 0.05, 0.0, 0.0],  # low entropy: epsilon binds
            [1 / 6] * 6,  # uniform: delta * exp(-H) = 0.3 / 6 = 0.05 binds
            [0.3, 0.3, 0.2, 0.2, 0.0, 0.0]]
    probs = torch.tensor(rows, dtype=torch.float64)
    thr = typical_threshold(probs, 0.09, 0.3).tolist()
    for row, t in zip(rows, thr):
        assert t == pytest.approx(min(0.09, 0.3 * math.exp(-_entropy(row))), rel=1e-9)
    assert thr[0] == pytest.approx(0.09)
    assert thr[1] == pytest.approx(0.05)
    assert thr[2] == pytest.approx(0.3 * math.exp(-_entropy(rows[2])))  # 0.0765...


def test_typical_high_entropy_accepts_per_formula():
    # Row 0 (root): H = 1.142, 0.3 * exp(-H) = 0.0957 -> threshold 0.09 (epsilon).
    #   node 1 drafts token 3 (p 0.05 < 0.09): rejected; node 2 drafts token 2 (p 0.15): accepted.
    # Row 2 (after node 2): uniform over 6, threshold 0.3/6 = 0.05 (delta); node 3 drafts token 4
    #   (p 1/6): accepted. Row 3: point mass on token 1 -> the bonus token is 1.
    # Node 4 sits under the rejected node 1 with p 1.0 and must not be taken.
    tree = tree_of([(0, 3), (0, 2), (2, 4), (1, 0)])
    probs = torch.tensor([
        [0.5, 0.3, 0.15, 0.05, 0.0, 0.0],
        [1.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        [1 / 6] * 6,
        [0.0, 1.0, 0.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 1.0, 0.0, 0.0, 0.0],
    ], dtype=torch.float64)
    acc = accept_typical(probs, tree, 0.09, 0.3, torch.Generator().manual_seed(0))
    assert acc.path == [0, 2, 3] and acc.bonus == 1
    # With a smaller epsilon the p=0.05 draft passes too: both root branches are accepted, the
    # deeper one wins (node 1 -> node 4 is as deep as node 2 -> node 3: earlier node wins).
    acc = accept_typical(probs, tree, 0.04, 0.3, torch.Generator().manual_seed(0))
    assert acc.path == [0, 1, 4]


def test_typical_rejects_everything_still_gains_one_token():
    tree = tree_of([(0, 5)])
    probs = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0, 0.0], [1 / 6] * 6], dtype=torch.float64)
    acc = accept_typical(probs, tree, 0.09, 0.3, torch.Generator().manual_seed(0))
    assert acc.path == [0] and acc.bonus == 3


# -- rejection sampling: the base distribution is preserved -------------------------------------
P1 = [0.30, 0.25, 0.20, 0.12, 0.08, 0.05]
N = 20000
# Chi-square critical values at p = 0.001 (fixed seeds make the test deterministic anyway).
CHI2_CRIT = {2: 13.816, 5: 20.515, 35: 66.619}


def _chi2(counts: list[int], expected: list[float]) -> float:
    return sum((c - e) ** 2 / e for c, e in zip(counts, expected))


def _conditionals() -> list[list[float]]:
    """P2[x] = distribution of the second token after first token x (differs per x)."""
    g = torch.Generator().manual_seed(3)
    rows = torch.rand(V, V, generator=g, dtype=torch.float64) + 0.3
    rows[torch.arange(V), torch.arange(V)] += 1.5  # strong dependence on x
    return (rows / rows.sum(-1, keepdim=True)).tolist()


@pytest.mark.parametrize("candidates", [[1], [1, 4], [0, 4, 5]], ids=["k1", "k2", "k3"])
def test_rejection_depth1_marginal_equals_base(candidates):
    tree = DraftTree([2] + candidates, [-1] + [0] * len(candidates))
    P2 = _conditionals()
    probs = torch.tensor([P1] + [P2[c] for c in candidates], dtype=torch.float64)
    gen = torch.Generator().manual_seed(11 + len(candidates))
    counts = [0] * V
    accepted = 0
    for _ in range(N):
        acc = accept_rejection(probs, tree, gen)
        first = tree.tokens[acc.path[1]] if acc.num_accepted else acc.bonus
        counts[first] += 1
        accepted += acc.num_accepted
    chi2 = _chi2(counts, [N * p for p in P1])
    assert chi2 < CHI2_CRIT[5], (counts, chi2)
    # The acceptance probability itself is exact too: sum of the candidates' base mass.
    p_acc = sum(P1[c] for c in candidates)
    assert abs(accepted / N - p_acc) < 4 * math.sqrt(p_acc * (1 - p_acc) / N)


def _joint_check(tree: DraftTree, seed: int) -> None:
    """Two tokens per sample; node rows are the right conditionals: row(root) = P1,
    row(node with token x at depth 1) = P2[x]. Tokens not decided within the tree are drawn
    as the next (plain) step would: the second from P2[first]."""
    P2 = _conditionals()
    rows = [P1] + [P2[tree.tokens[i]] if tree.depths[i] == 1 else P1
                   for i in range(1, len(tree.tokens))]
    probs = torch.tensor(rows, dtype=torch.float64)
    P2_t = torch.tensor(P2, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    counts = [0] * (V * V)
    depth_hist = [0, 0, 0]
    for _ in range(N):
        acc = accept_rejection(probs, tree, gen)
        toks = [tree.tokens[j] for j in acc.path[1:]] + [acc.bonus]
        if len(toks) == 1:
            toks.append(int(torch.multinomial(P2_t[toks[0]], 1, generator=gen)))
        counts[toks[0] * V + toks[1]] += 1
        depth_hist[acc.num_accepted] += 1
    expected = [N * P1[x] * P2[x][y] for x in range(V) for y in range(V)]
    chi2 = _chi2(counts, expected)
    assert chi2 < CHI2_CRIT[35], (chi2, counts)
    assert depth_hist[2] > 0.05 * N  # full-depth acceptance was exercised


def test_rejection_depth2_chain_joint_equals_base():
    # root -> node1 (token 0) -> node2 (token 0): P2[0] puts extra mass on 0.
    _joint_check(tree_of([(0, 0), (1, 0)]), seed=21)


def test_rejection_depth2_branching_tree_joint_equals_base():
    # root -> {0, 1}; 0 -> {0}; 1 -> {1, 3}
    _joint_check(tree_of([(0, 0), (0, 1), (1, 0), (2, 1), (2, 3)]), seed=22)


# -- tree.py ------------------------------------------------------------------------------------
def test_ancestor_mask_and_depths():
    tree = tree_of([(0, 2), (0, 3), (1, 4), (3, 5)])
    assert tree.depths == [0, 1, 1, 2, 3]
    m = tree.ancestor_mask()
    expected = torch.tensor([
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 0, 1, 0, 0],
        [1, 1, 0, 1, 0],
        [1, 1, 0, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(m, expected)
    assert tree.children() == [[1, 2], [3], [], [4], []]


def test_add_path_shares_prefixes_like_a_trie():
    tree = DraftTree.root_only(9)
    tree.add_path([1, 2, 3])
    tree.add_path([1, 2, 4])
    tree.add_path([1, 5])
    tree.add_path([1, 2, 3])  # already there: no new node
    assert tree.tokens == [9, 1, 2, 3, 4, 5]
    assert tree.parents == [-1, 0, 1, 2, 2, 1]
    assert tree.depths == [0, 1, 2, 3, 3, 2]
    tree.add_path([7], start=4)  # below an inner node
    assert tree.parents[-1] == 4 and tree.depths[-1] == 4
    assert tree.num_drafts == 6 and tree.max_depth == 4


def test_draft_tree_validation_and_truncation():
    with pytest.raises(ValueError):
        DraftTree([1, 2], [-1, 1])  # a node cannot be its own parent
    with pytest.raises(ValueError):
        DraftTree([1, 2], [0, -1])  # the root needs parent -1
    with pytest.raises(ValueError):
        DraftTree([1], [-1, 0])
    tree = tree_of([(0, 2), (1, 3), (0, 4)])
    t2 = tree.truncated(2)
    assert t2.tokens == [0, 2] and t2.parents == [-1, 0]
    assert tree.truncated(0).tokens == [0]  # the root always stays


def test_tree_from_choices_fills_ranks_and_skips_missing_depths():
    choices = [(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (2,)]
    topk = [[10, 11], [20, 21]]  # two depths, two ranks: (0,0,0) and (2,) do not fit
    tree = tree_from_choices(5, choices, topk)
    paths = set()
    for i in range(1, len(tree.tokens)):
        path, j = [], i
        while j > 0:
            path.append(tree.tokens[j])
            j = tree.parents[j]
        paths.add(tuple(reversed(path)))
    assert paths == {(10,), (11,), (10, 20), (10, 21), (11, 20)}
    assert tree.tokens[0] == 5 and tree.num_drafts == 5
    # Equal candidates at two ranks collapse into one node.
    assert tree_from_choices(5, [(0,), (1,)], [[7, 7]]).tokens == [5, 7]


def test_load_choices_presets_and_files(tmp_path):
    assert load_choices("chain4") == PRESETS["chain4"]
    got = load_choices("tree8")
    got.append((9,))
    assert (9,) not in PRESETS["tree8"]  # a copy, not the preset itself
    f = tmp_path / "tree.json"
    f.write_text(json.dumps([[0], [1], [0, 0], [0, 0, 1]]))
    assert load_choices(str(f)) == [(0,), (1,), (0, 0), (0, 0, 1)]


@pytest.mark.parametrize("content, needle", [
    ("not json", "JSON list"),
    ('[[0], ["x"]]', "JSON list"),
    ("[1, 2]", "JSON list"),
    ("[[0], [0, 0, 1]]", "lacks its parent"),
    ("[[0], [-1]]", "negative"),
    ("[[0], []]", "empty"),
])
def test_load_choices_rejects_bad_files(tmp_path, content, needle):
    f = tmp_path / "bad.json"
    f.write_text(content)
    with pytest.raises(ValueError, match=needle) as exc:
        load_choices(str(f))
    assert str(f) in str(exc.value)


def test_load_choices_unknown_name():
    with pytest.raises(ValueError, match="not a preset"):
        load_choices("no-such-tree")


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-38])
def test_tiny_temperature_is_a_finite_one_hot(temperature):
    """A denormal temperature must not overflow the top logit to +inf (NaN after softmax):
    the distribution is all on the argmax, and top_p tiny keeps only that token too."""
    from mtpserve.decoding.config import SamplingParams
    from mtpserve.decoding.spec.sampling import processed_probs
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0 - 1e-6], [0.5, -1.0, 0.25, 0.0]])
    for top_p in (1.0, 1e-300):
        probs = processed_probs(logits, SamplingParams(temperature=temperature, top_p=top_p))
        assert torch.isfinite(probs).all()
        assert probs.argmax(-1).tolist() == [1, 0]
        assert probs.max(-1).values.tolist() == [1.0, 1.0]


def test_sample_draws_by_the_probabilities_and_never_a_zero_one():
    """sample() (inverse CDF of one uniform per row): frequencies match the probabilities,
    a zero-probability token is never drawn (also first or last), unnormalized rows work,
    [V] -> [1] and [N, V] -> [N, 1], and a seeded generator repeats its draws."""
    from mtpserve.decoding.spec.sampling import sample

    p = torch.tensor([0.0, 0.2, 0.0, 0.5, 0.3, 0.0]) * 7  # unnormalized
    gen = torch.Generator().manual_seed(5)
    n = 20000
    counts = torch.bincount(sample(p.expand(n, 6).contiguous(), gen)[:, 0], minlength=6)
    assert counts[[0, 2, 5]].sum() == 0
    expected = [n * x for x in (0.2, 0.5, 0.3)]
    assert _chi2(counts[[1, 3, 4]].tolist(), expected) < CHI2_CRIT[2]
    one = torch.tensor([0.0, 0.0, 1.0])
    assert all(int(sample(one, gen)) == 2 for _ in range(50))
    assert sample(one, gen).shape == (1,) and sample(one.expand(4, 3), gen).shape == (4, 1)
    a, b = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert [int(sample(p, a)) for _ in range(20)] == [int(sample(p, b)) for _ in range(20)]
