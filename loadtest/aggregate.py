"""Per-level, per-arm aggregates of request records."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

from .records import RequestRecord
from .stats import Dist, goodput, summarize


@dataclass(frozen=True, slots=True)
class ClientSpecSummary:
    """Per-request ``metrics.speculative_decoding`` objects, combined over requests:
    counts summed; rates recomputed from sums; ``mean_acceptance_length`` and the
    per-position rates averaged with weights ``num_spec_steps``."""

    requests: int
    num_spec_steps: float
    num_draft_tokens: float
    num_accepted_draft_tokens: float
    draft_acceptance_rate: float | None
    mean_acceptance_length: float | None
    acceptance_rate_per_position: list[float]
    acceptance_histogram: list[float]
    acceptance_rules: list[str]


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def summarize_client_spec(specs: Sequence[dict[str, Any]]) -> ClientSpecSummary | None:
    if not specs:
        return None
    steps = drafts = accepted = 0.0
    mal_num = mal_den = 0.0
    pos_num: list[float] = []
    pos_den: list[float] = []
    hist: list[float] = []
    rules: set[str] = set()
    for s in specs:
        w = _num(s.get("num_spec_steps")) or 0.0
        steps += w
        drafts += _num(s.get("num_draft_tokens")) or 0.0
        accepted += _num(s.get("num_accepted_draft_tokens")) or 0.0
        mal = _num(s.get("mean_acceptance_length"))
        if mal is not None and w > 0:
            mal_num, mal_den = mal_num + mal * w, mal_den + w
        for i, r in enumerate(s.get("acceptance_rate_per_position") or []):
            if _num(r) is not None and w > 0:
                while len(pos_num) <= i:
                    pos_num.append(0.0)
                    pos_den.append(0.0)
                pos_num[i] += float(r) * w
                pos_den[i] += w
        for i, c in enumerate(s.get("acceptance_histogram") or []):
            while len(hist) <= i:
                hist.append(0.0)
            hist[i] += _num(c) or 0.0
        if s.get("acceptance_rule"):
            rules.add(str(s["acceptance_rule"]))
    return ClientSpecSummary(
        requests=len(specs), num_spec_steps=steps, num_draft_tokens=drafts,
        num_accepted_draft_tokens=accepted,
        draft_acceptance_rate=accepted / drafts if drafts else None,
        mean_acceptance_length=mal_num / mal_den if mal_den else None,
        acceptance_rate_per_position=[n / d for n, d in zip(pos_num, pos_den)],
        acceptance_histogram=hist, acceptance_rules=sorted(rules))


@dataclass(frozen=True, slots=True)
class ArmAggregate:
    """Aggregates of one arm at one level. Latency distributions (ms) are over successful
    requests; ITL is over all their inter-token gaps. Throughputs divide by the level's
    wall time (shared by both arms in A/B mode)."""

    arm: str
    num_sent: int             # finished, successfully or not (cancelled excluded)
    num_ok: int
    num_cancelled: int
    errors: dict[str, int]
    elapsed_s: float
    total_output_tokens: int
    request_throughput: float | None
    output_throughput: float | None
    ttft_ms: Dist
    tpot_ms: Dist
    itl_ms: Dist
    e2e_ms: Dist
    output_tokens: Dist
    goodput_requests: int | None = None
    goodput_rps: float | None = None
    client_spec: ClientSpecSummary | None = None
    token_count_sources: dict[str, int] = field(default_factory=dict)


def aggregate(records: Sequence[RequestRecord], arm: str, elapsed_s: float, *,
              slo_ttft_ms: float | None = None,
              slo_tpot_ms: float | None = None) -> ArmAggregate:
    mine = [r for r in records if r.arm == arm]
    ok = [r for r in mine if r.ok]
    cancelled = [r for r in mine if r.error_type == "cancelled"]
    errors = Counter(r.error_type for r in mine if not r.ok and r.error_type != "cancelled")
    tokens = sum(r.output_tokens for r in ok)
    rate = (lambda x: x / elapsed_s) if elapsed_s > 0 else (lambda x: None)
    good_n: int | None = None
    good_rps: float | None = None
    if slo_ttft_ms is not None or slo_tpot_ms is not None:
        good_n, good_rps = goodput([(r.ttft_s, r.tpot_s) for r in ok], elapsed_s,
                                   slo_ttft_ms, slo_tpot_ms)
    return ArmAggregate(
        arm=arm, num_sent=len(mine) - len(cancelled), num_ok=len(ok),
        num_cancelled=len(cancelled), errors=dict(sorted(errors.items())),
        elapsed_s=elapsed_s, total_output_tokens=tokens,
        request_throughput=rate(len(ok)), output_throughput=rate(tokens),
        ttft_ms=summarize([r.ttft_s for r in ok], 1000.0),
        tpot_ms=summarize([r.tpot_s for r in ok if r.tpot_s is not None], 1000.0),
        itl_ms=summarize([x for r in ok for x in r.itl_s], 1000.0),
        e2e_ms=summarize([r.e2e_s for r in ok], 1000.0),
        output_tokens=summarize([r.output_tokens for r in ok]),
        goodput_requests=good_n, goodput_rps=good_rps,
        client_spec=summarize_client_spec([r.spec for r in ok if r.spec]),
        token_count_sources=dict(Counter(r.token_count_source for r in ok)))
