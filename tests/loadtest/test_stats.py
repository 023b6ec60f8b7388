"""Pure statistics: percentiles, summaries, goodput, bootstrap CIs."""
import numpy as np
import pytest

from mtpserve.loadtest.stats import (bootstrap_ci, goodput, meets_slo, percentile,
                                     ratio_of_means, ratio_of_rates, summarize)


@pytest.mark.parametrize("n", [1, 2, 3, 10, 101])
def test_percentile_matches_numpy(n):
    rng = np.random.default_rng(n)
    xs = rng.exponential(size=n).tolist()
    for q in (0, 1, 25, 50, 90, 99, 99.9, 100):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)), rel=1e-12)


def test_percentile_rejects_bad_input():
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summarize_scales_and_skips_none():
    d = summarize([0.001, 0.002, None, 0.003], scale=1000.0)
    assert d.n == 3
    assert d.mean == pytest.approx(2.0)
    assert d.p50 == pytest.approx(2.0)
    assert d.p99 == pytest.approx(np.percentile([1, 2, 3], 99))
    assert summarize([]).mean is None


def test_goodput_counts_requests_meeting_all_slos():
    reqs = [(0.1, 0.01), (0.3, 0.01), (0.1, 0.05), (0.1, None), (None, None)]
    # TTFT <= 200 ms and TPOT <= 20 ms: first and fourth (no TPOT = single token) qualify
    assert goodput(reqs, 2.0, 200, 20) == (2, 1.0)
    assert goodput(reqs, 2.0, None, 20) == (4, 2.0)    # no TTFT SLO: the TTFT-less one passes
    assert goodput(reqs, 2.0, 200, None) == (3, 1.5)
    assert meets_slo(0.2, 0.02, 200, 20)               # boundaries are inclusive


def test_bootstrap_ci_contains_true_ratio():
    """B is 1.5x faster than A per prompt; per-prompt lengths and noise vary."""
    rng = np.random.default_rng(0)
    n = 80
    tokens = rng.integers(50, 400, n).astype(float)
    sec_a = tokens / 20.0 * rng.lognormal(0, 0.1, n)
    sec_b = tokens / 30.0 * rng.lognormal(0, 0.1, n)
    ci = bootstrap_ci(ratio_of_rates(tokens, sec_a, tokens, sec_b), n, seed=1)
    assert ci.contains(1.5)
    assert ci.lo < ci.point < ci.hi
    assert ci.hi - ci.lo < 0.2
    # same seed, same interval
    again = bootstrap_ci(ratio_of_rates(tokens, sec_a, tokens, sec_b), n, seed=1)
    assert (again.lo, again.hi) == (ci.lo, ci.hi)


def test_bootstrap_coverage_is_roughly_nominal():
    """Over 40 synthetic experiments the 95% CI misses the true ratio rarely."""
    misses = 0
    for trial in range(40):
        rng = np.random.default_rng(100 + trial)
        a = rng.lognormal(np.log(20.0), 0.3, 40)
        b = a / 2.0 * rng.lognormal(0, 0.05, 40) / np.exp(0.05 ** 2 / 2)
        ci = bootstrap_ci(ratio_of_means(a, b), 40, n_resamples=500, seed=trial)
        misses += not ci.contains(2.0)
    assert misses <= 6


def test_bootstrap_empty_and_degenerate():
    assert bootstrap_ci(lambda idx: 1.0, 0) is None
    ci = bootstrap_ci(ratio_of_means(np.ones(5), np.ones(5)), 5)
    assert (ci.point, ci.lo, ci.hi) == (1.0, 1.0, 1.0)
