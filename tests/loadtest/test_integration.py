"""The load tester against the scripted peer (conftest.py): reported numbers are exact."""
import asyncio
import json

import httpx
import pytest

from scripted_peer import GAP_S, MODEL_ID, NEAR_TIE_MARGIN, RETRY_AFTER, SPEC_K, TTFT_S
from mtpserve.loadtest.aggregate import aggregate
from mtpserve.loadtest.benchmark import resolve_model, run_benchmark
from mtpserve.loadtest.config import Arm, BenchmarkConfig, LoadLevel, RequestConfig
from mtpserve.loadtest.report import markdown_summary, results_dict
from mtpserve.loadtest.runner import build_items, run_level
from mtpserve.loadtest.workloads import Prompt

SPEC_ON = {"speculation": {"enabled": True}}
SPEC_OFF = {"speculation": {"enabled": False}}
N_TOKENS = 12  # a multiple of SPEC_K: every speculative step emits SPEC_K tokens


def prompts(*directives):
    return [Prompt(id=f"p{i}", prompt=f"prompt {i} {d}") for i, d in enumerate(directives)]


def level(mode="closed", value=2, n=4, duration=20.0):
    return LoadLevel(mode, value, n, duration)


def run(server, items_prompts, lvl, *, extra=None, **req):
    arm = Arm("main", server.base_url, MODEL_ID, extra_body=extra or {})
    cfg = RequestConfig(max_tokens=req.pop("max_tokens", N_TOKENS), **req)

    async def go():
        async with httpx.AsyncClient(trust_env=False) as http:
            items = build_items(items_prompts, [arm], lvl.num_requests)
            return await run_level(http, items, lvl, cfg)
    return asyncio.run(go())


def test_plain_stream_accounting(server):
    out = run(server, prompts("", "", "", ""), level(value=2, n=4))
    assert len(out.records) == 4
    for r in out.records:
        assert r.ok and r.error_type is None and r.finish_reason == "length"
        assert r.output_tokens == N_TOKENS and r.prompt_tokens == 7
        assert r.text == "".join(f" w{i:03d}" for i in range(N_TOKENS))
        assert r.event_tokens == [1] * N_TOKENS
        assert r.token_count_source == "usage+char_share"
        assert r.ttft_s >= TTFT_S
        assert len(r.itl_s) == N_TOKENS - 1
        assert r.event_offsets_s[-1] >= TTFT_S + (N_TOKENS - 1) * GAP_S  # server sleeps
        assert sum(r.itl_s) == pytest.approx(r.event_offsets_s[-1] - r.ttft_s)
        assert r.tpot_s == pytest.approx(sum(r.itl_s) / len(r.itl_s))
        assert r.e2e_s >= TTFT_S + (N_TOKENS - 1) * GAP_S
    agg = aggregate(out.records, "main", out.elapsed_s)
    assert (agg.num_ok, agg.errors, agg.total_output_tokens) == (4, {}, 4 * N_TOKENS)
    assert agg.itl_ms.n == 4 * (N_TOKENS - 1)
    assert agg.ttft_ms.min >= TTFT_S * 1000
    assert agg.output_throughput == pytest.approx(4 * N_TOKENS / out.elapsed_s)


def test_multi_token_events_spread_gap(server):
    out = run(server, prompts("", ""), level(value=2, n=2), extra=SPEC_ON)
    for r in out.records:
        assert r.ok and r.output_tokens == N_TOKENS
        assert r.event_tokens == [SPEC_K] * (N_TOKENS // SPEC_K)
        assert r.itl_s[:SPEC_K - 1] == [0.0] * (SPEC_K - 1)   # tokens of the first event
        gaps = [b - a for a, b in zip(r.event_offsets_s, r.event_offsets_s[1:])]
        expected = [0.0] * (SPEC_K - 1) + [g / SPEC_K for g in gaps for _ in range(SPEC_K)]
        assert r.itl_s == pytest.approx(expected)
        assert r.spec["num_spec_steps"] == N_TOKENS // SPEC_K
    agg = aggregate(out.records, "main", out.elapsed_s)
    assert agg.client_spec.draft_acceptance_rate == pytest.approx(2 / 3)
    assert agg.client_spec.mean_acceptance_length == pytest.approx(3.0)
    assert agg.client_spec.acceptance_rate_per_position == pytest.approx([1, 1, 0])


def test_token_counts_from_continuous_usage_and_logprobs(server):
    extra = {**SPEC_ON, "stream_options": {"include_usage": True,
                                           "continuous_usage_stats": True}}
    r = run(server, prompts(""), level(value=1, n=1), extra=extra).records[0]
    assert r.token_count_source == "usage+usage_stream"
    assert r.event_tokens == [SPEC_K] * (N_TOKENS // SPEC_K)
    r = run(server, prompts(""), level(value=1, n=1), extra={**SPEC_ON, "logprobs": True},
            endpoint="completions").records[0]
    assert r.token_count_source == "usage+logprobs"
    assert r.event_tokens == [SPEC_K] * (N_TOKENS // SPEC_K)


def test_ignore_eos_is_sent(server):
    lvl = level(value=1, n=1)
    assert run(server, prompts("[[eos=5]]"), lvl).records[0].output_tokens == 5
    r = run(server, prompts("[[eos=5]]"), lvl, ignore_eos=True).records[0]
    assert r.output_tokens == N_TOKENS and server.state.bodies[-1]["ignore_eos"] is True


def test_error_types(server):
    ps = prompts("[[mode=429]]", "[[mode=503]]", "[[mode=close]]", "[[mode=hang]]",
                 "[[mode=error_event]]", "", "")
    # 1 s: the hang (3 s) must time out, the six others answer within ms; at 0.5 s a
    # stalled VM timed all seven out once (fresh-clone CI, session 16)
    out = run(server, ps, level(value=7, n=7), timeout_s=1.0)
    by_id = {r.prompt_id: r for r in out.records}
    agg = aggregate(out.records, "main", out.elapsed_s)
    assert agg.errors == {"connection_closed": 1, "http_429": 1, "http_5xx": 1,
                          "stream_error": 1, "timeout": 1}
    assert agg.num_ok == 2 and agg.num_sent == 7 and agg.num_cancelled == 0
    assert agg.total_output_tokens == 2 * N_TOKENS  # failed requests add nothing
    assert by_id["p0"].status_code == 429 and by_id["p0"].retry_after_s == float(RETRY_AFTER)
    assert by_id["p1"].status_code == 503
    assert by_id["p2"].output_tokens == 2   # two events arrived before the drop
    assert by_id["p3"].e2e_s < 2.0          # the 3 s hang was cut at 1 s
    assert "scripted failure" in by_id["p4"].error_detail


def test_duration_cancels_in_flight(server):
    out = run(server, prompts("[[mode=hang]]", "[[mode=hang]]", "", ""),
              level(value=2, n=4, duration=0.6), timeout_s=30)
    assert out.elapsed_s < 2.0
    types = sorted(str(r.error_type) for r in out.records)
    assert types == ["cancelled", "cancelled"]   # the other two never started
    agg = aggregate(out.records, "main", out.elapsed_s)
    assert agg.num_cancelled == 2 and agg.errors == {} and agg.num_sent == 0


@pytest.mark.parametrize("rate", [50.0, float("inf")])
def test_open_loop(server, rate):
    out = run(server, prompts("", "", ""), level("open", rate, n=6))
    assert len(out.records) == 6 and all(r.ok for r in out.records)
    assert sorted(r.request_id for r in out.records) == list(range(6))
    if rate == float("inf"):
        assert max(r.start_s for r in out.records) < 0.1


def test_resolve_model(server):
    async def go():
        async with httpx.AsyncClient(trust_env=False) as http:
            return await resolve_model(http, Arm("A", server.base_url + "/v1"))
    assert asyncio.run(go()).model == MODEL_ID


def bench_config(server, *, arms, levels, endpoint="chat", warmup=0, temperature=0.0,
                 workload_path=None, top_logprobs=None, ab_schedule="interleaved", ab_blocks=4):
    return BenchmarkConfig(
        arms=arms, request=RequestConfig(endpoint=endpoint, max_tokens=N_TOKENS,
                                         temperature=temperature, timeout_s=5,
                                         top_logprobs=top_logprobs),
        levels=tuple(levels), workload=f"jsonl:{workload_path}", warmup=warmup,
        bootstrap_resamples=200, slo_ttft_ms=10_000, slo_tpot_ms=10_000,
        ab_schedule=ab_schedule, ab_blocks=ab_blocks)


def write_workload(tmp_path, lines):
    path = tmp_path / "w.jsonl"
    path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"q{i} {d}"}) + "\n"
                            for i, d in enumerate(lines)))
    return path


def test_metric_deltas_exact(server, tmp_path):
    path = write_workload(tmp_path, ["", "", "", ""])
    arm = Arm("main", server.base_url, extra_body=SPEC_ON)  # model from /v1/models
    cfg = bench_config(server, arms=(arm,), levels=[level(value=2, n=4), level(value=4, n=8)],
                       warmup=3, workload_path=path)
    result = asyncio.run(run_benchmark(cfg, progress=False))
    steps_per_request = N_TOKENS // SPEC_K
    for lv, n in zip(result.levels, (4, 8)):
        assert lv.arms["main"].num_ok == n
        stats = lv.server_metrics["server"]
        for source in ("mtpserve", "vllm"):  # warm-up requests are not in the deltas
            s = stats[source]
            assert s.num_drafts == n * steps_per_request
            assert s.num_draft_tokens == n * steps_per_request * SPEC_K
            assert s.num_accepted_tokens == n * steps_per_request * (SPEC_K - 1)
            assert s.acceptance_rate == pytest.approx(2 / 3)
            assert s.mean_accepted_per_step == pytest.approx(2.0)
            assert s.mean_acceptance_length == pytest.approx(3.0)
            assert s.acceptance_per_position == pytest.approx([1.0, 1.0, 0.0])
        assert lv.arms["main"].goodput_requests == n
    assert result.config.arms[0].model == MODEL_ID
    md = markdown_summary(result)
    assert "| c=2 | server | mtpserve | 16 | 48 | 32 | 0.667 | 2.000 | 3.000 |" in md


def test_missing_metrics_is_na(server, tmp_path):
    server.state.metrics_enabled = False
    path = write_workload(tmp_path, ["", ""])
    cfg = bench_config(server, arms=(Arm("main", server.base_url),),
                       levels=[level(value=1, n=2)], workload_path=path)
    result = asyncio.run(run_benchmark(cfg, progress=False))
    assert result.levels[0].server_metrics == {"server": None}
    assert result.levels[0].arms["main"].num_ok == 2
    assert "| c=1 | server | no /metrics | n/a" in markdown_summary(result)
    json.dumps(results_dict(result))


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_ab_speedup_and_mismatch(server, tmp_path, endpoint):
    path = write_workload(tmp_path, ["", "[[diverge=4]]", "", ""])
    arms = (Arm("A", server.base_url, extra_body=SPEC_OFF),
            Arm("B", server.base_url, extra_body=SPEC_ON))
    cfg = bench_config(server, arms=arms, levels=[level(value=2, n=4)], endpoint=endpoint,
                       workload_path=path)
    bodies_before = len(server.state.bodies)
    result = asyncio.run(run_benchmark(cfg, progress=False))
    lv = result.levels[0]
    assert {a: lv.arms[a].num_ok for a in "AB"} == {"A": 4, "B": 4}
    # interleaved: each prompt goes to both arms, order alternating
    sent = list(server.state.bodies)[bodies_before:bodies_before + 8]
    assert [b["speculation"]["enabled"] for b in sent].count(True) == 4
    ab = lv.ab
    assert ab.pairs == 4 and ab.compared == 4 and ab.identical == 3
    (m,) = ab.mismatches
    assert m.prompt_id == "q1"
    assert m.first_diff_char == 4 * 5 + 1   # token 4 = " x004" vs " w004"
    assert m.probe.error is None and m.probe.probe_text_matches_a
    assert m.probe.token_index == 4 and m.probe.token == " w004"
    assert m.probe.margin == pytest.approx(NEAR_TIE_MARGIN)
    assert m.probe.near_tie is True
    assert ab.speedup_tps.lo <= ab.speedup_tps.point <= ab.speedup_tps.hi
    assert ab.speedup_tps.point > 1.0 and ab.speedup_tpot.point > 1.0   # 3 tokens per event
    s = lv.server_metrics["server"]["mtpserve"]   # only arm B drafts
    assert s.num_drafts == 4 * N_TOKENS // SPEC_K
    md = markdown_summary(result)
    assert "3/4 identical" in md and "near tie" in md


def test_ab_skips_text_check_when_sampling(server, tmp_path):
    path = write_workload(tmp_path, ["[[diverge=1]]", ""])
    arms = (Arm("A", server.base_url, extra_body=SPEC_OFF),
            Arm("B", server.base_url, extra_body=SPEC_ON))
    cfg = bench_config(server, arms=arms, levels=[level(value=2, n=2)], temperature=0.7,
                       workload_path=path)
    ab = asyncio.run(run_benchmark(cfg, progress=False)).levels[0].ab
    assert ab.mismatch_check.startswith("skipped") and ab.mismatches == []


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_ab_judges_mismatch_from_in_run_logprobs(server, tmp_path, endpoint):
    """With logprobs asked in the run, the verdict comes from arm A's own run: nothing is
    re-asked, and arm B's margin at the same character is reported too."""
    path = write_workload(tmp_path, ["", "[[diverge=4]]", "", ""])
    arms = (Arm("A", server.base_url, extra_body=SPEC_OFF),
            Arm("B", server.base_url, extra_body=SPEC_ON))
    cfg = bench_config(server, arms=arms, levels=[level(value=2, n=4)], endpoint=endpoint,
                       workload_path=path, top_logprobs=2)
    bodies_before = len(server.state.bodies)
    ab = asyncio.run(run_benchmark(cfg, progress=False)).levels[0].ab
    sent = list(server.state.bodies)[bodies_before:]
    assert len(sent) == 8  # 4 prompts x 2 arms, no re-ask
    key = "top_logprobs" if endpoint == "chat" else "logprobs"
    assert all(b[key] == 2 for b in sent)
    (m,) = ab.mismatches
    p = m.probe
    assert p.source == "in-run" and p.error is None
    assert p.token_index == 4 and p.token == " w004"
    assert p.margin == pytest.approx(NEAR_TIE_MARGIN) and p.near_tie is True
    assert p.margin_b == pytest.approx(NEAR_TIE_MARGIN)


def run_alternating(server, tmp_path, requests: int, concurrency: int, blocks: int):
    """One closed level, A = speculation off, B = on, alternating schedule -> (result, each
    request's speculation switch in the order the server received them)."""
    path = write_workload(tmp_path, [""] * requests)
    arms = (Arm("A", server.base_url, extra_body=SPEC_OFF),
            Arm("B", server.base_url, extra_body=SPEC_ON))
    cfg = bench_config(server, arms=arms, levels=[level(value=concurrency, n=requests)],
                       workload_path=path, ab_schedule="alternating", ab_blocks=blocks)
    bodies_before = len(server.state.bodies)
    result = asyncio.run(run_benchmark(cfg, progress=False))
    return result, [b["speculation"]["enabled"]
                    for b in list(server.state.bodies)[bodies_before:]]


def test_ab_alternating_schedule_runs_chunks_abba(server, tmp_path):
    """Alternating schedule: each level's requests in chunks, each chunk by one arm then
    the other, order ABBA; each arm's counters and wall time are summed over its blocks."""
    result, spec = run_alternating(server, tmp_path, requests=6, concurrency=2, blocks=3)
    F, T = [False] * 2, [True] * 2
    assert spec == F + T + T + F + F + T  # chunks of 2: AB, BA, AB
    (lv,) = result.levels
    assert {a: lv.arms[a].num_ok for a in "AB"} == {"A": 6, "B": 6}
    assert lv.ab.pairs == 6 and lv.ab.identical == 6
    assert sorted(r.request_id for r in lv.records) == list(range(12))
    assert lv.server_metrics["B"]["mtpserve"].num_drafts == 6 * N_TOKENS // SPEC_K
    assert not lv.server_metrics["A"] or lv.server_metrics["A"]["mtpserve"].num_drafts == 0
    assert lv.elapsed_s == pytest.approx(lv.arms["A"].elapsed_s + lv.arms["B"].elapsed_s)
    summary = markdown_summary(result)
    assert "A/B schedule: alternating (3 blocks" in summary
    # one B/A ratio per chunk, shown as a range beside the CI over prompts
    assert len(lv.chunk_speedups) == 3 and all(r > 0 for r in lv.chunk_speedups)
    assert f"{min(lv.chunk_speedups):.3f}-{max(lv.chunk_speedups):.3f} (3)" in summary


def test_alternating_chunks_hold_at_least_the_concurrency(server, tmp_path):
    """8 requests at c=4 with 4 blocks asked: chunks of 2 would never reach 4 concurrent
    requests, so the level runs 2 chunks of 4 (AB, BA)."""
    result, spec = run_alternating(server, tmp_path, requests=8, concurrency=4, blocks=4)
    assert spec[:4].count(False) == 4 and spec[4:12].count(True) == 8 and spec[12:] == [False] * 4
    assert len(result.levels[0].chunk_speedups) == 2


def test_chunk_speedups_pair_each_chunks_two_blocks_whatever_their_order():
    from mtpserve.loadtest.benchmark import chunk_speedups

    blocks = [("A", 10.0), ("B", 12.0), ("B", 9.0), ("A", 10.0), ("A", 8.0), ("B", 8.0)]
    assert chunk_speedups(blocks, "A", "B") == pytest.approx([1.2, 0.9, 1.0])
    assert chunk_speedups(blocks[:3], "A", "B") == pytest.approx([1.2])  # an unpaired tail
    assert chunk_speedups([("A", 0.0), ("B", 5.0)], "A", "B") == []  # A produced nothing


def test_ab_separate_schedule_runs_each_arm_alone(server, tmp_path):
    """Separate schedule: per level one block per arm, order alternating (AB then BA); each
    block's /metrics deltas are labelled by arm, so only arm B's counters move."""
    path = write_workload(tmp_path, ["", "", "", ""])
    arms = (Arm("A", server.base_url, extra_body=SPEC_OFF),
            Arm("B", server.base_url, extra_body=SPEC_ON))
    cfg = bench_config(server, arms=arms, levels=[level(value=2, n=4), level(value=2, n=4)],
                       workload_path=path, ab_schedule="separate")
    bodies_before = len(server.state.bodies)
    result = asyncio.run(run_benchmark(cfg, progress=False))
    spec = [b["speculation"]["enabled"] for b in list(server.state.bodies)[bodies_before:]]
    assert spec == [False] * 4 + [True] * 4 + [True] * 4 + [False] * 4
    for lv in result.levels:
        assert {a: lv.arms[a].num_ok for a in "AB"} == {"A": 4, "B": 4}
        assert lv.ab.pairs == 4 and lv.ab.identical == 4
        assert sorted(r.request_id for r in lv.records) == list(range(8))
        assert lv.server_metrics["B"]["mtpserve"].num_drafts == 4 * N_TOKENS // SPEC_K
        assert not lv.server_metrics["A"] or \
            lv.server_metrics["A"]["mtpserve"].num_drafts == 0
        # each arm's wall time is its own block's: the level's is their sum
        assert lv.elapsed_s == pytest.approx(lv.arms["A"].elapsed_s + lv.arms["B"].elapsed_s)
    md = markdown_summary(result)
    assert "A/B schedule: separate" in md and "share each level's wall time" not in md
    json.dumps(results_dict(result))
