"""Fault injection on a real server: an engine fault fails only its own request, a client
that disconnects at any point of a stream leaves nothing behind, a full queue answers 429
at once and recovers.

Faults are raised inside the engine's step through its test-only `fault_hook` (called
for each sequence that gets logits in a step; whatever it raises fails that sequence
alone), or through `batch_fault_hook` (called before each step's batched forward;
whatever it raises fails every request of that step). Every test ends with the engine
idle: no running or waiting sequence, the KV cache empty, no admission slot held, no
asyncio task left on the server's loop.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import openai
import pytest

from mtpserve.server.app import ServerSettings
from server_helpers import scrape, sse_events, wait_idle

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
INJECTED = "injected fault"


def assert_openai_error(body: dict, code: str | None = None) -> dict:
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


def assert_clean(srv, tasks_before: int | None = None) -> None:
    """Nothing left behind: engine idle, KV empty, no slot held, no extra task."""
    assert wait_idle(srv.url, timeout=30) < 10  # an abort acts within a step or two
    m = scrape(srv.url)
    assert m[("mtpserve_kv_cache_usage_ratio", ())] == 0
    assert srv.state.client.inflight == 0
    if tasks_before is not None:
        deadline = time.monotonic() + 10
        while srv.num_tasks() > tasks_before:
            assert time.monotonic() < deadline, (srv.num_tasks(), tasks_before)
            time.sleep(0.05)
    assert httpx.get(srv.url + "/health").json() == {"status": "ok"}


class FaultHook:
    """Raise inside the engine for chosen sequences; counts what it injected."""

    def __init__(self) -> None:
        self.rules: list = []  # (predicate(seq) -> bool)
        self.injected: list[str] = []

    def __call__(self, seq) -> None:
        for rule in self.rules:
            if rule(seq):
                self.injected.append(seq.request_id)
                raise RuntimeError(f"{INJECTED} in {seq.request_id}")


@pytest.fixture
def fault_hook(shared_runner):
    hook = FaultHook()
    shared_runner.engine.fault_hook = hook
    yield hook
    shared_runner.engine.fault_hook = None


@pytest.fixture(scope="module")
def srv(make_server):
    return make_server(ServerSettings())


def test_engine_fault_fails_alone_while_concurrent_requests_finish(srv, model_name,
                                                                   fault_hook):
    good = [
        (COMPLETIONS, {"prompt": "The three primary colors are", "max_tokens": 12}),
        (COMPLETIONS, {"prompt": "def add(a, b):", "max_tokens": 12, "stream": True}),
        (CHAT, {"messages": [{"role": "user", "content": "Name three prime numbers."}],
                "max_tokens": 12}),
        (CHAT, {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 12,
                "stream": True}),
    ]

    def text_of(path: str, body: dict, r: httpx.Response) -> str:
        key = "text" if path == COMPLETIONS else "content"
        if not body.get("stream"):
            c = r.json()["choices"][0]
            return c["text"] if path == COMPLETIONS else c["message"]["content"]
        out = ""
        for e in sse_events(r)[:-1]:
            for c in e.get("choices", []):  # an error event has none
                out += (c.get(key) if path == COMPLETIONS else c["delta"].get(key)) or ""
        return out

    def call(path: str, body: dict) -> tuple[httpx.Response, str]:
        body = {"model": model_name, "temperature": 0, "ignore_eos": True, **body}
        with httpx.Client(timeout=120) as c:
            with c.stream("POST", srv.url + path, json=body) as r:
                r.read()
                return r, text_of(path, body, r) if r.status_code == 200 else ""

    expected = [call(path, body)[1] for path, body in good]  # each alone, no fault
    assert all(expected)

    # three faulty requests, told apart by max_tokens: a plain one failing after 2
    # tokens, a stream failing at its first token, n=3 where only choice 1 fails
    fault_hook.rules = [
        lambda s: s.params.max_tokens == 13 and s.num_emitted >= 2,
        lambda s: s.params.max_tokens == 14,
        lambda s: s.params.max_tokens == 15 and s.request_id.endswith("-1"),
    ]
    bad = [
        (COMPLETIONS, {"prompt": "Once upon a time", "max_tokens": 13}),
        (CHAT, {"messages": [{"role": "user", "content": "Tell a story."}], "max_tokens": 14,
                "stream": True}),
        (COMPLETIONS, {"prompt": "Once upon a time", "max_tokens": 15, "n": 3}),
    ]
    results: dict[int, tuple[httpx.Response, str]] = {}
    barrier = threading.Barrier(len(good) + len(bad))

    def run(i: int, path: str, body: dict) -> None:
        barrier.wait()
        results[i] = call(path, body)

    threads = [threading.Thread(target=run, args=(i, *req))
               for i, req in enumerate(good + bad)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert len(results) == len(good) + len(bad)

    for i in range(len(good)):  # untouched: the same greedy text as when alone
        r, text = results[i]
        assert r.status_code == 200 and text == expected[i], (i, text, expected[i])
    plain, stream, multi = (results[len(good) + k][0] for k in range(3))
    for r in (plain, multi):  # a server fault: 500, OpenAI's schema, the cause named
        assert r.status_code == 500
        err = assert_openai_error(r.json(), "engine_error")
        assert err["type"] == "server_error" and INJECTED in err["message"]
    assert stream.status_code == 200  # headers were out: the error is an event
    events = sse_events(stream)
    assert events[-1] == "[DONE]"
    err = assert_openai_error(events[-2], "engine_error")
    assert INJECTED in err["message"]
    assert len(fault_hook.injected) == 3  # each fault fired once, and failed its request
    fault_hook.rules = []
    assert_clean(srv)


def _failed_requests(m: dict, path: str) -> float:
    return m.get(("mtpserve_requests_total", (("endpoint", path), ("finish_reason", "error"),
                                              ("status", "500"))), 0)


def test_batch_fault_fails_its_step_and_the_engine_serves_on(srv, model_name, shared_runner):
    """A fault in a step's batched forward: the request(s) of that step fail as a
    per-request fault does (500 engine_error, or an error event and [DONE]); the engine
    thread lives on and the next request gets its normal answer."""
    assert_clean(srv)
    engine = shared_runner.engine
    plain = {"model": model_name, "prompt": "Once upon a time", "max_tokens": 12,
             "temperature": 0, "ignore_eos": True}
    ok = httpx.post(srv.url + COMPLETIONS, json=plain, timeout=120)
    assert ok.status_code == 200
    expected = ok.json()["choices"][0]["text"]
    marker = 17  # max_tokens of the requests whose steps fail
    hit: list[list[str]] = []

    def hook(seqs) -> None:
        if any(s.params.max_tokens == marker and s.num_emitted >= 2 for s in seqs):
            hit.append([s.request_id for s in seqs])
            raise RuntimeError(f"{INJECTED} in the batch")

    before = scrape(srv.url)
    engine.batch_fault_hook = hook
    try:
        r = httpx.post(srv.url + COMPLETIONS, json={**plain, "max_tokens": marker}, timeout=120)
        chat = {"model": model_name, "messages": [{"role": "user", "content": "Tell a story."}],
                "max_tokens": marker, "temperature": 0, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", srv.url + CHAT, json=chat, timeout=120) as s:
            assert s.status_code == 200  # headers were out: the error is an event
            events = sse_events(s)
    finally:
        engine.batch_fault_hook = None
    assert r.status_code == 500
    err = assert_openai_error(r.json(), "engine_error")
    assert err["type"] == "server_error" and INJECTED in err["message"]
    assert events[-1] == "[DONE]"
    err = assert_openai_error(events[-2], "engine_error")
    assert INJECTED in err["message"]
    assert all("choices" in e for e in events[:-2]) and len(events) > 3  # tokens came first
    assert [len(b) for b in hit] == [1, 1]  # one step each, holding only its request
    after = scrape(srv.url)
    for path in (COMPLETIONS, CHAT):  # each faulted request counted once as failed
        assert _failed_requests(after, path) - _failed_requests(before, path) == 1

    assert shared_runner.is_alive and shared_runner.fatal_error is None
    again = httpx.post(srv.url + COMPLETIONS, json=plain, timeout=120)
    assert again.status_code == 200 and again.json()["choices"][0]["text"] == expected
    assert_clean(srv)


def _raw_request(port: int, path: str, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return s


def _read_until(s: socket.socket, predicate, limit: float = 60) -> bytes:
    buf = b""
    deadline = time.monotonic() + limit
    while not predicate(buf):
        assert time.monotonic() < deadline, buf[-300:]
        chunk = s.recv(65536)
        assert chunk, buf[-300:]
        buf += chunk
    return buf


def _events(buf: bytes) -> int:
    return buf.partition(b"\r\n\r\n")[2].count(b"data: ")


LONG = {"max_tokens": 400, "temperature": 0, "ignore_eos": True}
POINTS = {  # where the client hangs up
    "before_response": lambda b: True,
    "after_headers": lambda b: b"\r\n\r\n" in b,
    "after_first_event": lambda b: _events(b) >= 1,
    "mid_stream": lambda b: _events(b) >= 4,
    "after_finish_reason": lambda b: b'"finish_reason":"length"' in b,
}


@pytest.mark.parametrize("point", list(POINTS))
@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
def test_disconnect_at_any_point_of_a_stream_leaves_nothing(srv, model_name, shared_runner,
                                                          point, path):
    assert_clean(srv)
    tasks = srv.num_tasks()
    before = scrape(srv.url)
    engine_tokens = shared_runner.stats().generated_tokens
    prompt = ({"prompt": "Write a long story about a dragon."} if path == COMPLETIONS else
              {"messages": [{"role": "user", "content": "Write a long story."}]})
    body = {"model": model_name, "stream": True, **prompt, **LONG}
    if point == "after_finish_reason":
        body["max_tokens"] = 6
    s = _raw_request(srv.port, path, body)
    _read_until(s, POINTS[point])
    s.close()
    assert_clean(srv, tasks)  # within 30 s: a 400-token generation would take far longer
    after = scrape(srv.url)
    gone = after.get(("mtpserve_requests_total", (("endpoint", path), ("finish_reason", "abort"),
                                                  ("status", "499"))), 0) - \
        before.get(("mtpserve_requests_total", (("endpoint", path), ("finish_reason", "abort"),
                                                ("status", "499"))), 0)
    generated = after[("mtpserve_generation_tokens_total", ())] - \
        before[("mtpserve_generation_tokens_total", ())]
    engine_generated = shared_runner.stats().generated_tokens - engine_tokens
    assert engine_generated < 100  # the engine dropped it, not only the server
    if point == "after_finish_reason":
        assert generated == 6  # complete: counted as answered or as gone, never both
    elif point == "before_response":
        assert gone <= 1 and generated < 400  # gone before the app read it: nothing began
    else:
        assert gone == 1 and generated < 400


def test_disconnect_while_waiting_for_a_slot_and_plain_requests(srv, model_name,
                                                                 shared_runner):
    """Fill every engine slot, queue one more, hang up on all of them: nothing stays."""
    assert_clean(srv)
    tasks = srv.num_tasks()
    slots = shared_runner.engine.config.max_num_seqs
    streams = [_raw_request(srv.port, COMPLETIONS, {
        "model": model_name, "prompt": f"Story number {i}:", "stream": True, **LONG})
        for i in range(slots)]
    for s in streams:
        _read_until(s, POINTS["after_first_event"])
    waiting = _raw_request(srv.port, COMPLETIONS, {
        "model": model_name, "prompt": "Waiting:", **LONG})  # plain, not streamed
    deadline = time.monotonic() + 30
    while scrape(srv.url)[("mtpserve_num_requests_waiting", ())] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    waiting.close()
    for s in streams:
        s.close()
    assert_clean(srv, tasks)


def test_full_queue_answers_429_at_once_and_recovers(make_server, model_name):
    tiny = make_server(ServerSettings(max_num_seqs=1, max_queued=1))  # 2 in flight at most
    assert_clean(tiny)
    streams = [_raw_request(tiny.port, COMPLETIONS, {
        "model": model_name, "prompt": f"Story {i}:", "stream": True, **LONG})
        for i in range(2)]
    for s in streams:
        _read_until(s, POINTS["after_first_event"])
    client = openai.OpenAI(base_url=tiny.url + "/v1", api_key="x", max_retries=0)
    elapsed = []
    for i in range(5):
        t0 = time.monotonic()
        r = httpx.post(tiny.url + COMPLETIONS, json={"model": model_name, "prompt": "Hi",
                                                      "max_tokens": 4}, timeout=30)
        elapsed.append(time.monotonic() - t0)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        err = assert_openai_error(r.json(), "rate_limit_exceeded")
        assert "the limit is 2" in err["message"] and "--max-queued 1" in err["message"]
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model=model_name, prompt="Hi", max_tokens=4)
    # answered while the two streams still hold their slots, without waiting for them
    assert tiny.state.client.inflight == 2
    assert max(elapsed) < 2.0, elapsed
    for s in streams:
        s.close()
    assert_clean(tiny)
    r = client.completions.create(model=model_name, prompt="Hi", max_tokens=4, temperature=0)
    assert r.usage.completion_tokens == 4 or r.choices[0].finish_reason == "stop"
