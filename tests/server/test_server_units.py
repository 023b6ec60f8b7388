"""Pure tests: metrics math, the asyncio bridge and the body-size middleware (no model)."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mtpserve.decoding.config import SamplingParams
from mtpserve.decoding.engine.outputs import EngineStats, RequestOutput, SpecStats
from mtpserve.server.engine_client import EngineClient, QueueFull
from mtpserve.server.metrics import ServerMetrics, exported_metric_names, overall_finish_reason
from mtpserve.server.middleware import BodySizeLimitMiddleware


def samples(metrics: ServerMetrics) -> dict[tuple[str, tuple], float]:
    body, _ = metrics.render()
    out = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def out(n_new: int, total: int, finished=False, reason=None, spec=None) -> RequestOutput:
    return RequestOutput("r", list(range(n_new)), "x" * n_new, 5, total, finished=finished,
                         finish_reason=reason, spec=spec)


def spec_after(steps: list[tuple[int, int, int]]) -> SpecStats:
    s = SpecStats(acceptance_rule="greedy")
    for depths, nodes, acc in steps:
        s.record_step(depths, nodes, acc)
    return s


def test_exported_names_cover_agreed_names():
    names = exported_metric_names()
    for base in ("mtpserve_requests", "mtpserve_prompt_tokens", "mtpserve_generation_tokens",
                 "mtpserve_spec_decode_num_drafts", "mtpserve_spec_decode_num_draft_tokens",
                 "mtpserve_spec_decode_num_accepted_tokens",
                 "mtpserve_spec_decode_num_accepted_tokens_per_pos",
                 "mtpserve_spec_decode_num_drafts_per_pos"):
        assert base + "_total" in names
    for h in ("mtpserve_time_to_first_token_seconds", "mtpserve_inter_token_latency_seconds",
              "mtpserve_e2e_request_latency_seconds", "mtpserve_tokens_per_step"):
        assert {h + "_bucket", h + "_sum", h + "_count"} <= names
    assert {"mtpserve_num_requests_running", "mtpserve_num_requests_waiting",
            "mtpserve_kv_cache_usage_ratio"} <= names
    # every name a scrape shows is announced
    m = ServerMetrics(lambda: EngineStats(2, 1, 0.25, 10, 100))
    tr = m.tracker("/v1/completions", 0.0)
    tr.observe(0, out(1, 1, spec=spec_after([(2, 2, 1)])), 0.1)
    tr.finish(200, 5, 1, t=0.2)
    assert {name for name, _ in samples(m)} <= names


def test_inter_token_latency_spreads_a_multi_token_event():
    m = ServerMetrics()
    tr = m.tracker("/v1/completions", arrival=10.0)
    tr.observe(0, out(1, 1), 10.5)   # TTFT 0.5
    tr.observe(0, out(3, 4), 11.1)   # gap 0.6 over 3 tokens -> 3 x 0.2
    tr.observe(0, out(0, 4), 11.2)   # no tokens: nothing observed
    tr.observe(0, out(1, 5, True, "length"), 11.5)  # 1 x 0.4 (since the last token)
    tr.finish(200, 5, 5, t=11.5)
    s = samples(m)
    assert s[("mtpserve_time_to_first_token_seconds_count", ())] == 1
    assert s[("mtpserve_time_to_first_token_seconds_sum", ())] == pytest.approx(0.5)
    assert s[("mtpserve_inter_token_latency_seconds_count", ())] == 4
    assert s[("mtpserve_inter_token_latency_seconds_sum", ())] == pytest.approx(1.0)
    assert s[("mtpserve_inter_token_latency_seconds_bucket", (("le", "0.2"),))] == 3
    assert s[("mtpserve_tokens_per_step_count", ())] == 3
    assert s[("mtpserve_tokens_per_step_sum", ())] == 5
    assert s[("mtpserve_e2e_request_latency_seconds_sum", ())] == pytest.approx(1.5)
    assert s[("mtpserve_generation_tokens_total", ())] == 5
    assert s[("mtpserve_prompt_tokens_total", ())] == 5
    key = ("mtpserve_requests_total", (("endpoint", "/v1/completions"),
                                       ("finish_reason", "length"), ("status", "200")))
    assert s[key] == 1


def test_spec_counters_follow_cumulative_deltas_over_choices():
    m = ServerMetrics()
    tr = m.tracker("/v1/chat/completions", 0.0)
    a1 = spec_after([(3, 4, 2)])
    a2 = spec_after([(3, 4, 2), (3, 4, 0), (2, 2, 1)])
    b1 = spec_after([(1, 1, 1)])
    tr.observe(0, out(3, 3, spec=a1), 1.0)
    tr.observe(1, out(2, 2, spec=b1), 1.0)
    tr.observe(0, out(1, 4, spec=a2), 2.0)
    tr.observe(0, out(2, 6, True, "stop", spec=a2), 2.5)  # unchanged stats: no increment
    tr.observe(1, out(0, 2, True, "length", spec=b1), 2.5)
    tr.finish(200, 9, 8)
    s = samples(m)
    assert s[("mtpserve_spec_decode_num_drafts_total", ())] == 4
    assert s[("mtpserve_spec_decode_num_draft_tokens_total", ())] == 11
    assert s[("mtpserve_spec_decode_num_accepted_tokens_total", ())] == 4
    acc = {lbl[0][1]: v for (n, lbl), v in s.items()
           if n == "mtpserve_spec_decode_num_accepted_tokens_per_pos_total"}
    drafted = {lbl[0][1]: v for (n, lbl), v in s.items()
               if n == "mtpserve_spec_decode_num_drafts_per_pos_total"}
    assert acc == {"0": 3, "1": 1, "2": 0}  # drafted-only positions exist at 0
    assert drafted == {"0": 4, "1": 3, "2": 2}
    # finish reason priority over choices
    key = ("mtpserve_requests_total", (("endpoint", "/v1/chat/completions"),
                                       ("finish_reason", "length"), ("status", "200")))
    assert s[key] == 1
    assert overall_finish_reason(["stop", "abort", "length"]) == "abort"
    assert overall_finish_reason([None]) == "none"


def test_gauges_read_engine_stats_at_scrape_time():
    stats = {"v": None}
    m = ServerMetrics(lambda: stats["v"])
    assert samples(m)[("mtpserve_num_requests_running", ())] == 0
    stats["v"] = EngineStats(3, 2, 0.5, 1, 1)
    s = samples(m)
    assert s[("mtpserve_num_requests_running", ())] == 3
    assert s[("mtpserve_num_requests_waiting", ())] == 2
    assert s[("mtpserve_kv_cache_usage_ratio", ())] == 0.5


# -- engine client -------------------------------------------------------------------------


class FakeRunner:
    """Delivers scripted outputs from another thread, like EngineRunner."""

    is_alive = True

    def __init__(self, tokens_per_request: int = 3) -> None:
        self.tokens = tokens_per_request
        self.submitted: list[str] = []
        self.aborted: list[str] = []
        self.hold = threading.Event()

    def submit(self, rid, prompt_ids, params, on_output):
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        self.submitted.append(rid)

        def feed():
            for i in range(self.tokens):
                if i == 1:
                    self.hold.wait(5)
                if rid in self.aborted:
                    on_output(RequestOutput(rid, [], "", 1, i, True, "abort"))
                    return
                last = i == self.tokens - 1
                on_output(RequestOutput(rid, [i], f"<{params.seed}:{i}>", len(prompt_ids), i + 1,
                                        last, "length" if last else None))
        threading.Thread(target=feed, daemon=True).start()

    def abort(self, rid):
        self.aborted.append(rid)
        self.hold.set()


def test_engine_client_fans_out_and_admits_atomically():
    async def main():
        runner = FakeRunner()
        runner.hold.set()
        client = EngineClient(runner, capacity=3)
        stream = client.submit([([1], SamplingParams(seed=7)), ([1], SamplingParams(seed=8))])
        assert client.inflight == 2
        with pytest.raises(QueueFull):
            client.submit([([1], SamplingParams()), ([1], SamplingParams())])
        assert client.inflight == 2  # a refused group takes nothing
        texts = {0: "", 1: ""}
        async for i, o, _ in stream:
            texts[i] += o.new_text
        assert texts == {0: "<7:0><7:1><7:2>", 1: "<8:0><8:1><8:2>"}
        assert client.inflight == 0 and await client.wait_idle(0.1)
        # an engine validation error releases the slots and aborts what went in
        with pytest.raises(ValueError):
            client.submit([([1], SamplingParams()), ([], SamplingParams())])
        assert client.inflight == 0 and len(runner.aborted) == 1
        # one oversize group is admitted when nothing else runs
        big = client.submit([([1], SamplingParams())] * 5)
        big.close()
    asyncio.run(main())


def test_engine_client_aborts_when_the_consumer_goes_away():
    async def main():
        runner = FakeRunner(tokens_per_request=5)
        client = EngineClient(runner, capacity=4)
        got = []

        async def consume():
            async for o in client.generate([1, 2], SamplingParams()):
                got.append(o)

        task = asyncio.ensure_future(consume())
        while not got:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert runner.aborted == runner.submitted
        assert client.inflight == 0
    asyncio.run(main())


# -- body size middleware ------------------------------------------------------------------


async def _echo_app(scope, receive, send):
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def _call(mw, chunks, headers=()):
    sent = []
    queue = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
             for i, c in enumerate(chunks)]

    async def receive():
        return queue.pop(0) if queue else {"type": "http.disconnect"}

    async def send(msg):
        sent.append(msg)

    scope = {"type": "http", "method": "POST", "path": "/v1/completions",
             "headers": list(headers)}
    asyncio.run(mw(scope, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def test_body_limit_counts_streamed_bytes_and_content_length():
    rejected = []
    mw = BodySizeLimitMiddleware(_echo_app, 10, on_reject=rejected.append)
    assert _call(mw, [b"12345", b"67890"]) == (200, b"1234567890")
    status, body = _call(mw, [b"123456", b"789012"])  # chunked past the limit
    assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"
    status, _ = _call(mw, [b"1"], headers=[(b"content-length", b"11")])
    assert status == 413 and len(rejected) == 2
    status, _ = _call(mw, [b"1"], headers=[(b"content-length", b"x")])
    assert status == 400


def test_the_native_backend_names_its_weights_and_kv_cache(shared_runner):
    """The startup log line (ServerState) says what the engine chose: the shared test engine
    is dense fp32, whose KV cache stays fp32 (auto keeps fp16 for quantized weights)."""
    from mtpserve.server.engine_api import NativeBackend

    text = NativeBackend(shared_runner).describe()
    assert "weights dense, float32, KV cache float32;" in text, text
