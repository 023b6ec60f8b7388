"""Pure statistics: percentiles, distribution summaries, goodput, bootstrap CIs."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks
    (numpy's default method). Raises ValueError on empty input."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(frozen=True, slots=True)
class Dist:
    """Summary of a sample; all fields None when the sample is empty."""

    n: int = 0
    mean: float | None = None
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None
    min: float | None = None
    max: float | None = None


def summarize(values: Sequence[float], scale: float = 1.0) -> Dist:
    """Summary of ``values`` multiplied by ``scale`` (e.g. 1000 for s -> ms)."""
    xs = [v * scale for v in values if v is not None and not math.isnan(v)]
    if not xs:
        return Dist()
    return Dist(n=len(xs), mean=sum(xs) / len(xs), p50=percentile(xs, 50),
                p90=percentile(xs, 90), p99=percentile(xs, 99), min=min(xs), max=max(xs))


def meets_slo(ttft_s: float | None, tpot_s: float | None, slo_ttft_ms: float | None,
              slo_tpot_ms: float | None) -> bool:
    """True when the request met every SLO given. A request without a TPOT (one output
    token) meets any TPOT SLO; one without a TTFT meets none."""
    if slo_ttft_ms is not None and (ttft_s is None or ttft_s * 1000.0 > slo_ttft_ms):
        return False
    if slo_tpot_ms is not None and tpot_s is not None and tpot_s * 1000.0 > slo_tpot_ms:
        return False
    return True


def goodput(requests: Sequence[tuple[float | None, float | None]], elapsed_s: float,
            slo_ttft_ms: float | None, slo_tpot_ms: float | None) -> tuple[int, float | None]:
    """(number of successful requests meeting the SLOs, those per second) over
    ``(ttft_s, tpot_s)`` pairs of successful requests."""
    good = sum(meets_slo(t, p, slo_ttft_ms, slo_tpot_ms) for t, p in requests)
    return good, (good / elapsed_s if elapsed_s > 0 else None)


@dataclass(frozen=True, slots=True)
class CI:
    """A point estimate with a bootstrap confidence interval."""

    point: float
    lo: float
    hi: float
    confidence: float
    n: int

    def contains(self, x: float) -> bool:
        return self.lo <= x <= self.hi


def bootstrap_ci(statistic: Callable[[np.ndarray], float], n: int, *,
                 n_resamples: int = 2000, confidence: float = 0.95,
                 seed: int = 0) -> CI | None:
    """Percentile bootstrap over ``n`` units. ``statistic(idx)`` computes the estimate
    from the unit indices ``idx`` (``arange(n)`` for the point estimate; resamples draw
    indices with replacement). Resamples whose statistic is not finite are dropped.
    Returns None when n == 0 or the point estimate is not finite."""
    if n <= 0:
        return None
    point = float(statistic(np.arange(n)))
    if not math.isfinite(point):
        return None
    rng = np.random.default_rng(seed)
    draws = np.fromiter((statistic(rng.integers(0, n, n)) for _ in range(n_resamples)),
                        dtype=float, count=n_resamples)
    draws = draws[np.isfinite(draws)]
    if draws.size == 0:
        return CI(point, point, point, confidence, n)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(draws, [alpha, 1.0 - alpha])
    return CI(point, float(lo), float(hi), confidence, n)


def ratio_of_rates(num_a: np.ndarray, den_a: np.ndarray, num_b: np.ndarray,
                   den_b: np.ndarray) -> Callable[[np.ndarray], float]:
    """Statistic for paired units: (sum num_b / sum den_b) / (sum num_a / sum den_a),
    e.g. B's output tokens/s over A's when num = tokens and den = seconds."""
    def stat(idx: np.ndarray) -> float:
        with np.errstate(divide="ignore", invalid="ignore"):
            return float((num_b[idx].sum() / den_b[idx].sum())
                         / (num_a[idx].sum() / den_a[idx].sum()))
    return stat


def ratio_of_means(a: np.ndarray, b: np.ndarray) -> Callable[[np.ndarray], float]:
    """Statistic for paired units: mean(a) / mean(b) (e.g. TPOT of A over TPOT of B,
    so >1 means B is faster)."""
    def stat(idx: np.ndarray) -> float:
        with np.errstate(divide="ignore", invalid="ignore"):
            return float(a[idx].mean() / b[idx].mean())
    return stat
