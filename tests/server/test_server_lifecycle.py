"""Cancellation, metrics exactness, loading, draining and the `mtpserve serve` process."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from mtpserve.server.app import ServerSettings
from server_helpers import free_port, scrape, sse_events, wait_idle

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
LONG = {"prompt": "Write a very long story about a dragon.", "max_tokens": 900,
        "temperature": 0, "ignore_eos": True}


def delta(before: dict, after: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_metrics_move_by_exact_amounts(server_url, model_name):
    wait_idle(server_url)
    before = scrape(server_url)
    r = httpx.post(server_url + CHAT, json={
        "model": model_name, "max_tokens": 16, "temperature": 0,
        "messages": [{"role": "user", "content": "List three animals."}]}, timeout=120).json()
    after = scrape(server_url)
    usage, spec = r["usage"], r["metrics"]["speculative_decoding"]
    reason = r["choices"][0]["finish_reason"]
    assert delta(before, after, "mtpserve_requests_total", endpoint=CHAT, status="200",
                 finish_reason=reason) == 1
    assert delta(before, after, "mtpserve_prompt_tokens_total") == usage["prompt_tokens"]
    assert delta(before, after, "mtpserve_generation_tokens_total") == \
        usage["completion_tokens"]
    assert delta(before, after, "mtpserve_tokens_per_step_sum") == usage["completion_tokens"]
    assert delta(before, after, "mtpserve_tokens_per_step_count") <= usage["completion_tokens"]
    assert delta(before, after, "mtpserve_time_to_first_token_seconds_count") == 1
    assert delta(before, after, "mtpserve_e2e_request_latency_seconds_count") == 1
    itl = delta(before, after, "mtpserve_inter_token_latency_seconds_count")
    assert 0 < itl <= usage["completion_tokens"] - 1
    assert delta(before, after, "mtpserve_spec_decode_num_drafts_total") == \
        spec["num_spec_steps"]
    assert delta(before, after, "mtpserve_spec_decode_num_draft_tokens_total") == \
        spec["num_draft_tokens"]
    assert delta(before, after, "mtpserve_spec_decode_num_accepted_tokens_total") == \
        spec["num_accepted_draft_tokens"]
    for pos, accepted in enumerate(spec["accepted_per_position"]):
        assert delta(before, after, "mtpserve_spec_decode_num_accepted_tokens_per_pos_total",
                     position=str(pos)) == accepted
    # a rejected request counts with finish_reason "none"
    httpx.post(server_url + CHAT, json={"messages": []})
    assert delta(after, scrape(server_url), "mtpserve_requests_total", endpoint=CHAT,
                 status="400", finish_reason="none") == 1


def test_streaming_disconnect_aborts_in_the_engine(server_url, model_name):
    wait_idle(server_url)
    before = scrape(server_url)
    with httpx.Client(timeout=120) as c:
        with c.stream("POST", server_url + COMPLETIONS,
                      json={**LONG, "model": model_name, "stream": True}) as r:
            # keep the line iterator referenced: dropping it closes the connection early
            lines = r.iter_lines()
            events: list[str] = []
            while len(events) < 3:
                line = next(lines)
                if line:
                    events.append(line)
            assert all(e.startswith("data: {") for e in events)
            m = scrape(server_url)
            assert m[("mtpserve_num_requests_running", ())] + \
                m[("mtpserve_num_requests_waiting", ())] == 1
    # the client hung up; the engine must drop the request long before 900 tokens
    assert wait_idle(server_url, timeout=15) < 15
    after = scrape(server_url)
    assert delta(before, after, "mtpserve_requests_total", endpoint=COMPLETIONS,
                 status="499", finish_reason="abort") == 1
    assert delta(before, after, "mtpserve_generation_tokens_total") < 900
    r = httpx.post(server_url + COMPLETIONS, json={"prompt": "Hi", "max_tokens": 4,
                                                   "temperature": 0}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_non_streaming_disconnect_aborts_in_the_engine(server_url, model_name):
    wait_idle(server_url)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server_url + COMPLETIONS, json={**LONG, "model": model_name}, timeout=1.5)
    assert wait_idle(server_url, timeout=15) < 15
    r = httpx.post(server_url + CHAT, json={"messages": [{"role": "user", "content": "Hi"}],
                                            "max_tokens": 4, "temperature": 0}, timeout=60)
    assert r.status_code == 200


def test_503_while_loading_then_ready(make_server, shared_runner):
    release = threading.Event()

    def slow_factory():
        release.wait(30)
        return shared_runner

    srv = make_server(source=slow_factory, wait_healthy=False)
    h = httpx.get(srv.url + "/health")
    assert h.status_code == 503 and h.json() == {"status": "loading"}
    r = httpx.post(srv.url + COMPLETIONS, json={"prompt": "x"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "loading"
    assert httpx.get(srv.url + "/metrics").status_code == 200
    release.set()
    deadline = time.monotonic() + 30
    while httpx.get(srv.url + "/health").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    r = httpx.post(srv.url + COMPLETIONS, json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200


def test_load_failure_reports_error(make_server):
    def broken():
        raise RuntimeError("no such model file")

    srv = make_server(source=broken, wait_healthy=False)
    deadline = time.monotonic() + 10
    while srv.state.status == "loading":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    h = httpx.get(srv.url + "/health")
    assert h.status_code == 503 and h.json() == {"status": "error"}
    r = httpx.post(srv.url + COMPLETIONS, json={"prompt": "x"})
    assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable_error"


def test_drain_finishes_in_flight_and_refuses_new(make_server, model_name, shared_runner):
    srv = make_server(ServerSettings(drain_timeout=60), drain_timeout=60)
    result: dict = {}
    first = threading.Event()

    def stream():
        with httpx.stream("POST", srv.url + COMPLETIONS, timeout=120, json={
                "model": model_name, "prompt": "Once upon a time", "max_tokens": 24,
                "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}) as r:
            events = []
            for line in r.iter_lines():
                if line:
                    events.append(line)
                    first.set()
            result["events"] = events

    t = threading.Thread(target=stream)
    t.start()
    assert first.wait(60)
    srv.state.begin_drain()  # what SIGTERM does first (see cli.DrainingServer)
    h = httpx.get(srv.url + "/health")
    assert h.status_code == 503 and h.json() == {"status": "draining"}
    r = httpx.post(srv.url + COMPLETIONS, json={"prompt": "x"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "draining"
    srv.stop()
    t.join(60)
    events = result["events"]
    assert events[-1] == "data: [DONE]"
    assert '"completion_tokens":24' in events[-2]
    assert shared_runner.is_alive  # a shared runner is not the app's to stop


def test_drain_timeout_aborts_what_is_left(make_server, server_url, model_name):
    wait_idle(server_url)
    srv = make_server(ServerSettings(drain_timeout=1), drain_timeout=1)
    started = threading.Event()

    def stream():
        try:
            with httpx.stream("POST", srv.url + COMPLETIONS, timeout=120,
                              json={**LONG, "model": model_name, "stream": True}) as r:
                for line in r.iter_lines():
                    started.set()
        except httpx.HTTPError:
            pass

    t = threading.Thread(target=stream)
    t.start()
    assert started.wait(60)
    t0 = time.monotonic()
    srv.stop()
    assert time.monotonic() - t0 < 15
    assert wait_idle(server_url, timeout=15) < 15
    t.join(30)


# -- the real command line ---------------------------------------------------------------


def test_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "mtpserve.server.cli", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "serve" in out.stdout
    if importlib.util.find_spec("mtpserve.decoding.tools.commands") is not None:
        for cmd in ("generate", "bench", "train-heads", "inspect", "build-kernels"):
            assert cmd in out.stdout
    out = subprocess.run([sys.executable, "-m", "mtpserve.server.cli", "serve", "--help"],
                         capture_output=True, text=True, timeout=120)
    for flag in ("--host", "--port", "--api-key", "--max-queued", "--max-body-bytes",
                 "--drain-timeout", "--cors-origins", "--log-prompts", "--served-model-name",
                 "--max-tokens-limit"):
        assert flag in out.stdout


@pytest.mark.skipif(importlib.util.find_spec("mtpserve.decoding.tools.commands") is None,
                    reason="engine commands module not available")
def test_serve_process_drains_on_sigterm_and_exits_0(tmp_path):
    """SIGTERM under load: every stream in flight finishes whole, new requests and
    /health get 503 (the port stays open while draining), then the process exits 0
    well within --drain-timeout."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "serve.log", "w+")
    env = {**os.environ, "MTPSERVE_API_KEY": "k"}
    drain_timeout = 60
    proc = subprocess.Popen(
        [sys.executable, "-m", "mtpserve.server.cli", "serve", "--port", str(port),
         "--dtype", "float32", "--max-model-len", "256", "--drain-timeout", str(drain_timeout),
         "--compile", "off",
         "--max-num-seqs", "2", "--max-queued", "2", "--served-model-name", "tiny"],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 240
        seen_503 = False
        while True:
            assert proc.poll() is None, open(tmp_path / "serve.log").read()
            try:
                h = httpx.get(url + "/health", timeout=2)
                if h.status_code == 200:
                    break
                seen_503 |= h.status_code == 503
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become healthy"
            time.sleep(0.2)
        headers = {"Authorization": "Bearer k"}
        assert httpx.get(url + "/v1/models", headers=headers).json()["data"][0]["id"] == "tiny"
        results: dict[int, list[str]] = {}
        started = [threading.Event() for _ in range(3)]  # 2 running, 1 waiting for a slot
        N = 160  # long enough that the streams are still running at the signal (~1 s in)

        def stream(i: int) -> None:
            with httpx.stream("POST", url + COMPLETIONS, headers=headers, timeout=120, json={
                    "model": "tiny", "prompt": f"Once upon a time {i}", "max_tokens": N,
                    "temperature": 0, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}) as r:
                lines = []
                for line in r.iter_lines():
                    if line:
                        lines.append(line)
                        started[i].set()
                results[i] = lines

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for e in started[:2]:
            assert e.wait(120)
        t_signal = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)  # the signal handler has run
        refused = httpx.post(url + COMPLETIONS, headers=headers, timeout=30,
                             json={"model": "tiny", "prompt": "late", "max_tokens": 2})
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "draining"
        assert set(refused.json()["error"]) == {"message", "type", "param", "code"}
        h = httpx.get(url + "/health", timeout=30)
        assert h.status_code == 503 and h.json() == {"status": "draining"}
        for t in threads:
            t.join(120)
        assert proc.wait(120) == 0, open(tmp_path / "serve.log").read()
        assert time.monotonic() - t_signal < drain_timeout / 2  # left once idle, not at the timeout
        for i in range(3):  # all in flight at the signal (one waiting) finished whole
            lines = results[i]
            assert lines[-1] == "data: [DONE]", lines[-3:]
            assert f'"completion_tokens":{N}' in lines[-2]
            assert '"finish_reason":"length"' in lines[-3]
        with pytest.raises(httpx.TransportError):  # and now the port is closed
            httpx.get(url + "/health", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_engine_error_mid_request(server_url, model_name, shared_runner):
    """A request failing inside the engine: 500 when plain, an error event when streamed."""
    engine = shared_runner.engine
    marker = 13  # max_tokens value that identifies the requests to break

    def hook(seq):
        if seq.params.max_tokens == marker and seq.num_emitted >= 2:
            raise RuntimeError("injected failure")

    engine.fault_hook = hook
    try:
        body = {"model": model_name, "prompt": "Once upon a time", "max_tokens": marker,
                "temperature": 0, "ignore_eos": True}
        r = httpx.post(server_url + COMPLETIONS, json=body, timeout=120)
        assert r.status_code == 500
        assert r.json()["error"]["code"] == "engine_error"
        assert "injected failure" in r.json()["error"]["message"]
        with httpx.stream("POST", server_url + COMPLETIONS, json={**body, "stream": True},
                          timeout=120) as s:
            assert s.status_code == 200
            events = sse_events(s)
        assert events[-1] == "[DONE]"
        assert events[-2]["error"]["code"] == "engine_error"
        assert all("choices" in e for e in events[:-2])
    finally:
        engine.fault_hook = None
    ok = httpx.post(server_url + COMPLETIONS, json={**body, "max_tokens": 4}, timeout=120)
    assert ok.status_code == 200


def test_cors_off_by_default_and_on_when_asked(make_server, server_url):
    pre = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST"}
    r = httpx.options(server_url + COMPLETIONS, headers=pre)
    assert "access-control-allow-origin" not in r.headers
    srv = make_server(ServerSettings(cors_origins=["http://app.example"]))
    r = httpx.options(srv.url + COMPLETIONS, headers=pre)
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "http://app.example"
