"""The load tester against a real mtpserve (default model): what it reports must match
the server's own usage, per-request speculation stats and Prometheus counters."""

from __future__ import annotations

import asyncio

from mtpserve.loadtest.benchmark import run_benchmark
from mtpserve.loadtest.config import Arm, BenchmarkConfig, LoadLevel, RequestConfig


def _config(url: str, tmp_prompts: str) -> BenchmarkConfig:
    arms = (Arm("off", url, extra_body={"speculation": {"enabled": False}}),
            Arm("on", url, extra_body={"speculation": {"enabled": True}}))
    return BenchmarkConfig(
        arms=arms,
        request=RequestConfig(endpoint="chat", max_tokens=24, temperature=0.0, seed=0),
        levels=(LoadLevel("closed", 2, 3, 120.0),),
        workload=f"jsonl:{tmp_prompts}",
        warmup=0,
        bootstrap_resamples=200,
    )


def test_ab_run_matches_server_accounting(server_url, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '{"messages": [{"role": "user", "content": "List the numbers from 1 to 12, comma separated."}]}\n'
        '{"messages": [{"role": "user", "content": "Write a Python function that adds two numbers."}]}\n'
        '{"messages": [{"role": "user", "content": "Say hello three times."}]}\n')
    result = asyncio.run(run_benchmark(_config(server_url, str(prompts)), progress=False))
    (level,) = result.levels
    recs = level.records
    assert len(recs) == 6 and all(r.ok for r in recs), [r.error_detail for r in recs]
    # Output tokens come from the server's usage chunk; the events carry all of them.
    for r in recs:
        assert r.output_tokens == sum(r.event_tokens) > 0
        assert r.spec is not None
    # Greedy: both arms must return identical text for every prompt.
    assert level.ab is not None and level.ab.compared == 3 and level.ab.identical == 3
    # The scraped counter deltas equal the sum of per-request stats of the "on" arm
    # (the "off" arm drafts nothing).
    on = [r for r in recs if r.arm == "on"]
    off = [r for r in recs if r.arm == "off"]
    assert all(r.spec["num_draft_tokens"] == 0 for r in off)
    stats = next(iter(level.server_metrics.values()))["mtpserve"]
    assert stats.num_draft_tokens == sum(r.spec["num_draft_tokens"] for r in on)
    assert stats.num_accepted_tokens == sum(r.spec["num_accepted_draft_tokens"] for r in on)
    assert stats.num_drafts == sum(r.spec["num_spec_steps"] for r in on)
    # One SSE event per engine step: a step that accepted drafts sends several tokens
    # in one event, so the "on" arm needs fewer token-bearing events than tokens.
    for r in recs:
        assert len(r.event_tokens) <= r.spec["num_steps"] + 1  # + the prefill's first token
    accepted = sum(r.spec["num_accepted_draft_tokens"] for r in on)
    if accepted:
        assert sum(len(r.event_tokens) for r in on) < sum(r.output_tokens for r in on)
