"""Prometheus metrics of the server, in their own CollectorRegistry.

Names (the deploy dashboard and tests rely on them; `exported_metric_names()` lists every
sample name):

- `mtpserve_requests_total{endpoint,status,finish_reason}`: one per HTTP request to a
  generation endpoint. `status` is the HTTP status; `finish_reason` is the request's
  outcome: error > abort > length > stop over its choices, "none" when it never reached
  the engine (4xx/5xx before generation).
- `mtpserve_prompt_tokens_total`, `mtpserve_generation_tokens_total`: move by exactly the
  response's `usage.prompt_tokens` / `usage.completion_tokens` (aborted requests count
  what they generated).
- histograms `mtpserve_time_to_first_token_seconds` (per choice, from arrival),
  `mtpserve_inter_token_latency_seconds` (per token: an event carrying k tokens after a
  gap g observes g/k k times), `mtpserve_e2e_request_latency_seconds` (per HTTP request),
  `mtpserve_tokens_per_step` (tokens per engine output delta).
- gauges `mtpserve_num_requests_running`, `mtpserve_num_requests_waiting`,
  `mtpserve_kv_cache_usage_ratio`, read from `EngineRunner.stats()` at scrape time.
- counters `mtpserve_spec_decode_num_drafts_total` (verify steps with drafts),
  `..._num_draft_tokens_total`, `..._num_accepted_tokens_total`,
  `..._num_accepted_tokens_per_pos_total{position}`, `..._num_drafts_per_pos_total{position}`
  (position 0-based: 0 is the first drafted token after the verified one), incremented by
  the differences between successive cumulative `SpecStats` of each engine request, so
  they equal the sum of the responses' `metrics.speculative_decoding`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram,
                               generate_latest)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics import _get_use_created
from prometheus_client.registry import Collector

from mtpserve.decoding.engine.outputs import EngineStats, RequestOutput, SpecStats

log = logging.getLogger(__name__)

TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
               0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0,
               120.0, 300.0)
TOKENS_PER_STEP_BUCKETS = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16)

FINISH_PRIORITY = ("error", "abort", "length", "stop")

GAUGES = {
    "mtpserve_num_requests_running": "Requests in the engine's running batch.",
    "mtpserve_num_requests_waiting": "Requests waiting for a slot in the engine.",
    "mtpserve_kv_cache_usage_ratio": "Fraction of KV-cache slots in use (0..1).",
}


def overall_finish_reason(reasons: Iterable[str | None]) -> str:
    """One label for a request with several choices: error > abort > length > stop."""
    got = {r for r in reasons if r}
    for r in FINISH_PRIORITY:
        if r in got:
            return r
    return "none"


class _EngineStatsCollector(Collector):
    def __init__(self, source: Callable[[], EngineStats | None]) -> None:
        self.source = source

    def collect(self):  # type: ignore[override]
        stats = None
        try:
            stats = self.source()
        except Exception:  # scraping must not fail because the engine is loading
            log.debug("engine stats unavailable", exc_info=True)
        values = (
            (stats.num_running, stats.num_waiting, stats.kv_cache_usage) if stats
            else (0, 0, 0.0))
        for (name, doc), value in zip(GAUGES.items(), values):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], float(value))
            yield g


@dataclass(slots=True)
class _SpecSnapshot:
    steps: int = 0
    drafts: int = 0
    accepted: int = 0
    accepted_pos: list[int] = field(default_factory=list)
    drafted_pos: list[int] = field(default_factory=list)


@dataclass(slots=True)
class _ChoiceState:
    last_t: float | None = None
    spec: _SpecSnapshot = field(default_factory=_SpecSnapshot)
    output_tokens: int = 0
    prompt_tokens: int = 0
    finish_reason: str | None = None


class ServerMetrics:
    def __init__(self, stats_source: Callable[[], EngineStats | None] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("mtpserve_requests_total", "HTTP generation requests.",
                                ["endpoint", "status", "finish_reason"], registry=r)
        self.prompt_tokens = Counter("mtpserve_prompt_tokens_total",
                                     "Prompt tokens (usage.prompt_tokens).", registry=r)
        self.generation_tokens = Counter("mtpserve_generation_tokens_total",
                                         "Generated tokens (usage.completion_tokens).",
                                         registry=r)
        self.ttft = Histogram("mtpserve_time_to_first_token_seconds",
                              "Arrival to first token, per choice.", buckets=TTFT_BUCKETS,
                              registry=r)
        self.itl = Histogram("mtpserve_inter_token_latency_seconds",
                             "Gap between tokens, spread evenly over a multi-token event.",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("mtpserve_e2e_request_latency_seconds",
                             "Arrival to last token, per HTTP request.", buckets=E2E_BUCKETS,
                             registry=r)
        self.tokens_per_step = Histogram("mtpserve_tokens_per_step",
                                         "Tokens delivered per engine output event.",
                                         buckets=TOKENS_PER_STEP_BUCKETS, registry=r)
        self.spec_drafts = Counter("mtpserve_spec_decode_num_drafts_total",
                                   "Verify steps that checked drafted tokens.", registry=r)
        self.spec_draft_tokens = Counter("mtpserve_spec_decode_num_draft_tokens_total",
                                         "Drafted tokens verified.", registry=r)
        self.spec_accepted_tokens = Counter("mtpserve_spec_decode_num_accepted_tokens_total",
                                            "Drafted tokens accepted.", registry=r)
        self.spec_accepted_per_pos = Counter(
            "mtpserve_spec_decode_num_accepted_tokens_per_pos_total",
            "Drafted tokens accepted at each draft position (0-based).", ["position"],
            registry=r)
        self.spec_drafts_per_pos = Counter(
            "mtpserve_spec_decode_num_drafts_per_pos_total",
            "Verify steps offering a draft at each position (0-based).", ["position"],
            registry=r)
        self._stats_source: Callable[[], EngineStats | None] = stats_source or (lambda: None)
        r.register(_EngineStatsCollector(lambda: self._stats_source()))

    # -- wiring ---------------------------------------------------------------------------
    def set_stats_source(self, source: Callable[[], EngineStats | None]) -> None:
        self._stats_source = source

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def record_request(self, endpoint: str, status: int, finish_reason: str = "none") -> None:
        self.requests.labels(endpoint=endpoint, status=str(status),
                             finish_reason=finish_reason).inc()

    def tracker(self, endpoint: str, arrival: float) -> "RequestTracker":
        return RequestTracker(self, endpoint, arrival)

    # -- names ------------------------------------------------------------------------------
    def metric_names(self) -> set[str]:
        created = _get_use_created()
        names: set[str] = set()
        for m in (self.requests, self.prompt_tokens, self.generation_tokens, self.spec_drafts,
                  self.spec_draft_tokens, self.spec_accepted_tokens,
                  self.spec_accepted_per_pos, self.spec_drafts_per_pos):
            names.add(m._name + "_total")
            if created:
                names.add(m._name + "_created")
        for h in (self.ttft, self.itl, self.e2e, self.tokens_per_step):
            names.update(h._name + s for s in ("_bucket", "_sum", "_count"))
            if created:
                names.add(h._name + "_created")
        names.update(GAUGES)
        return names


def exported_metric_names() -> set[str]:
    """Every sample name /metrics can expose (with _total/_bucket/_sum/_count/_created)."""
    return ServerMetrics().metric_names()


class RequestTracker:
    """Follows one HTTP request's choices; feeds the histograms and counters."""

    def __init__(self, metrics: ServerMetrics, endpoint: str, arrival: float) -> None:
        self.metrics = metrics
        self.endpoint = endpoint
        self.arrival = arrival
        self.last_token_t: float | None = None
        self.choices: dict[int, _ChoiceState] = {}
        self.done = False

    def observe(self, index: int, out: RequestOutput, t: float) -> None:
        """One engine delta of choice `index`, received at monotonic time `t`."""
        m = self.metrics
        st = self.choices.setdefault(index, _ChoiceState())
        k = len(out.new_token_ids)
        if k:
            m.tokens_per_step.observe(k)
            if st.last_t is None:
                m.ttft.observe(max(0.0, t - self.arrival))
            else:
                gap = max(0.0, t - st.last_t) / k
                for _ in range(k):
                    m.itl.observe(gap)
            st.last_t = t
            self.last_token_t = t
        st.output_tokens = out.num_output_tokens
        st.prompt_tokens = out.num_prompt_tokens or st.prompt_tokens
        if out.finished:
            st.finish_reason = out.finish_reason
        if out.spec is not None:
            self._spec_delta(st.spec, out.spec)

    def _spec_delta(self, prev: _SpecSnapshot, cur: SpecStats) -> None:
        m = self.metrics
        d_steps = cur.num_spec_steps - prev.steps
        d_drafts = cur.num_draft_tokens - prev.drafts
        d_acc = cur.num_accepted_draft_tokens - prev.accepted
        if d_steps > 0:
            m.spec_drafts.inc(d_steps)
        if d_drafts > 0:
            m.spec_draft_tokens.inc(d_drafts)
        if d_acc > 0:
            m.spec_accepted_tokens.inc(d_acc)
        for pos, value in enumerate(cur.accepted_per_position):
            old = prev.accepted_pos[pos] if pos < len(prev.accepted_pos) else 0
            if value > old:
                m.spec_accepted_per_pos.labels(position=str(pos)).inc(value - old)
        for pos, value in enumerate(cur.drafted_per_position):
            old = prev.drafted_pos[pos] if pos < len(prev.drafted_pos) else 0
            if value > old:
                m.spec_drafts_per_pos.labels(position=str(pos)).inc(value - old)
                # Create the paired series at 0, so per-position acceptance (accepted /
                # drafts by position) has data before anything is accepted there.
                m.spec_accepted_per_pos.labels(position=str(pos))
        prev.steps = cur.num_spec_steps
        prev.drafts = cur.num_draft_tokens
        prev.accepted = cur.num_accepted_draft_tokens
        prev.accepted_pos = list(cur.accepted_per_position)
        prev.drafted_pos = list(cur.drafted_per_position)

    def finish(self, status: int, prompt_tokens: int, completion_tokens: int,
               finish_reason: str | None = None, t: float | None = None) -> None:
        """Once per HTTP request that reached the engine (idempotent)."""
        if self.done:
            return
        self.done = True
        m = self.metrics
        if finish_reason is None:
            finish_reason = overall_finish_reason(c.finish_reason for c in self.choices.values())
        m.record_request(self.endpoint, status, finish_reason)
        if prompt_tokens > 0:
            m.prompt_tokens.inc(prompt_tokens)
        if completion_tokens > 0:
            m.generation_tokens.inc(completion_tokens)
        end = t if t is not None else self.last_token_t
        if end is not None:
            m.e2e.observe(max(0.0, end - self.arrival))
