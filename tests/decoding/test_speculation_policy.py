"""The auto policy's decisions from measured step costs and acceptance (pure logic)."""

from __future__ import annotations

from mtpserve.decoding.config import SpecConfig
from mtpserve.decoding.spec.heads import MedusaHeads
from mtpserve.decoding.spec.policy import FRESH_STEPS, MIN_GAIN, PROBE_EVERY, SpeculationPolicy
from mtpserve.decoding.spec.tree import load_choices


def _policy(proposer: str = "ngram", tree: str = "chain4") -> SpeculationPolicy:
    heads = MedusaHeads(8, 16, 4, 1, default_tree=tree) if proposer != "ngram" else None
    return SpeculationPolicy(SpecConfig(mode="auto", proposer=proposer, tree=tree), heads)


def _teach(policy: SpeculationPolicy, cost_per_step, accept: float, steps: int = 200) -> None:
    for n in (1, 2, 4, 8, 16, 32, 64, 128):
        for _ in range(50):
            policy.observe_step(n, cost_per_step(n))
    hits = int(round(accept * 10))
    for i in range(steps):  # depth-4 drafts accepted `accept` of the time at each depth
        policy.observe_acceptance(4, 4 if i % 10 < hits else 0)


def test_nodes_count_the_heads_tree_and_the_ngram_chain():
    tree16 = load_choices("tree16")
    p = _policy("hybrid", "tree16")
    for d in (1, 2, 3):
        assert p.nodes(d) == 1 + sum(len(c) <= d for c in tree16) + min(d, 4)
    assert _policy("ngram").nodes(3) == 4
    assert _policy("heads", "chain4").nodes(2) == 3


def test_auto_stops_drafting_when_verifying_costs_as_much_as_it_saves():
    p = _policy()
    _teach(p, lambda n: 0.01 * n, accept=0.5)  # cost linear in tokens: never pays
    depths = [p.draft_depths(1, 1) for _ in range(PROBE_EVERY - 1)]
    assert depths == [[0]] * (PROBE_EVERY - 1)
    # the periodic probe keeps measuring, at the depth auto would resume with: the
    # cheapest here, where every drafted token costs as much as it may save
    assert p.draft_depths(1, 1) == [1] == [p.resume_depth(1)]


def test_while_drafting_the_probe_drafts_fully():
    p = _policy()
    _teach(p, lambda n: 0.02 * (1 if n <= 2 else n), accept=0.6)  # 2 tokens cost 1
    assert p.best_depth(1) == 1
    depths = [p.draft_depths(1, 1)[0] for _ in range(PROBE_EVERY)]
    assert depths == [1] * (PROBE_EVERY - 1) + [p.max_depth]


def test_auto_drafts_fully_when_verifying_is_nearly_free_and_drafts_are_good():
    p = _policy()
    _teach(p, lambda n: 0.01 * (1 + 0.01 * n), accept=0.8)
    assert p.draft_depths(1, 1) == [p.max_depth]


def test_auto_shrinks_drafts_as_the_batch_grows():
    """Flat cost up to 8 tokens, then linear (a compute-bound regime): batch 1 drafts,
    batch 8 gets little or no draft."""
    p = _policy()
    _teach(p, lambda n: 0.02 * max(1.0, n / 8), accept=0.6)
    assert p.best_depth(1) >= 3
    assert p.best_depth(8) == 0


def test_auto_probes_one_sequence_at_a_time():
    """Drafting off for a batch of 8: each probe step drafts fully for ONE sequence, round
    robin, not for the whole batch (whose tree would cost several plain steps)."""
    p = _policy()
    _teach(p, lambda n: 0.02 * max(1.0, n / 8), accept=0.6)
    probes = []
    for step in range(1, 4 * PROBE_EVERY + 1):
        depths = p.draft_depths(8, 8)
        drafting = [i for i, d in enumerate(depths) if d]
        if step % PROBE_EVERY:
            assert drafting == []
        else:
            assert len(drafting) == 1 and depths[drafting[0]] == p.resume_depth(8) < p.max_depth
            probes.append(drafting[0])
    assert len(set(probes)) == 4  # a different sequence each time
    assert p.draft_depths(8, 0) == []
    on = SpeculationPolicy(SpecConfig(mode="on", proposer="ngram", tree="chain4"), None)
    assert on.draft_depths(8, 3) == [on.max_depth] * 3


def test_auto_prices_pass_sizes_it_never_saw_from_the_measured_curve():
    """32 sequences, the plain step and the probe's 37-token step measured (compute-bound:
    cost grows with tokens): a 96-token draft pass is priced along that slope, so drafting
    stays off even with good acceptance, and no 96-token step is tried to find out."""
    p = _policy("hybrid", "chain2")
    for n, s in ((1, 0.03), (2, 0.031), (4, 0.033), (8, 0.06), (32, 0.6), (37, 0.69)):
        for _ in range(20):
            p.observe_step(n, s)
    for _ in range(100):
        p.observe_acceptance(2, 1)  # 100% at depth 1
    assert p._cost(96) > 1.6  # 0.69 + slope (0.66 / 36 per token) * 59
    assert p._cost(6) == (0.033 + 0.06) / 2  # between measured sizes: interpolated
    assert p.best_depth(32) == 0
    assert p.best_depth(1) > 0  # at batch 1 a 2-4 token pass costs ~1.1x: drafting pays
    assert p.best_depth(3) == 0  # a batch size never measured: its plain step first



def test_a_bigger_pass_is_never_priced_below_a_smaller_one_measured():
    """A stale entry (a 72-token pass timed long ago, at a shorter context) cheaper than
    the 32-sequence plain step must not make drafting at 24 sequences look cheap."""
    p = _policy("hybrid", "chain2")  # depth 1: 3 tokens per sequence
    for n, s in ((1, 0.03), (2, 0.031), (4, 0.033), (24, 0.25), (32, 0.3), (40, 0.5),
                 (72, 0.2)):
        for _ in range(20):
            p.observe_step(n, s)
    p.depth_accept = [0.5] * p.max_depth
    assert p._curve(72) == 0.2  # what the table says ...
    assert p._cost(72) == 0.5  # ... and what a 72-token pass is priced at
    assert p._cost(3) == p._curve(3) == 0.032  # above the floor: interpolated as before
    assert p.best_depth(24) == 0  # 1.5 tokens / 0.5 s < 1 token / 0.25 s
    # the same table without the stale entry's floor would have drafted:
    assert 1.5 / p._curve(72) > MIN_GAIN / p._cost(24)


def test_a_stale_cost_entry_needs_a_clear_predicted_gain():
    """A 5% predicted gain drafts when the draft pass's cost was measured lately, not when
    that entry is stale (the estimates' noise is larger); a 30% gain drafts either way."""
    p = _policy("ngram", "chain4")  # depth d: 1 + d tokens
    p.depth_accept = [0.6, 0.0, 0.0, 0.0]  # a depth-1 draft holds 1.6 tokens per step
    for n, s in ((3, 1.0), (4, 1.0), (5, 1.0), (2, 0.1 * 1.6 / 1.05), (1, 0.1)):
        for _ in range(20):
            p.observe_step(n, s)
    rates = p._rates(1)
    assert abs(rates[1] / rates[0] - 1.05) < 1e-9
    assert p.best_depth(1) == 1  # the 2-token pass was timed 20 steps ago: fresh
    for _ in range(FRESH_STEPS):
        p.observe_step(1, 0.1)
    assert p.best_depth(1) == 0  # now stale: 5% is within its noise
    p.step_cost[2] = 0.1 * 1.6 / 1.3
    assert p._rates(1)[1] / p._rates(1)[0] > MIN_GAIN and p.best_depth(1) == 1
