"""Every error path over real HTTP: OpenAI's error schema, the right status, never 422/500."""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest

from mtpserve.server.app import ServerSettings
from server_helpers import sse_events

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"


def assert_error(r: httpx.Response, status: int, code=None, contains: str = "") -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code, err
    assert contains in err["message"], err["message"]
    return err


@pytest.mark.parametrize("path, body, contains", [
    (COMPLETIONS, b"{not json", "not valid JSON"),
    (COMPLETIONS, b"", "empty"),
    (COMPLETIONS, b"[1, 2, 3]", "JSON object"),
    (COMPLETIONS, b'{"prompt": "caf\xe9 \xff"}', "not valid JSON"),  # invalid UTF-8
    (COMPLETIONS, b'{"prompt": "x", "max_tokens": "8"}', "max_tokens"),
    (COMPLETIONS, b'{"prompt": "x", "max_tokens": -5}', "max_tokens"),
    (COMPLETIONS, b'{"prompt": "x", "max_tokens": 100000000000000000000000000}', "1024"),
    (COMPLETIONS, b'{"prompt": "x", "temperature": -1}', "temperature"),
    (COMPLETIONS, b'{"prompt": "x", "temperature": 1e308}', "temperature"),
    (COMPLETIONS, b'{"prompt": "x", "n": 100}', "n"),
    (COMPLETIONS, b'{"prompt": "x", "top_p": true}', "top_p"),
    (COMPLETIONS, b'{"prompt": "x", "seed": 1e3}', "seed"),
    (COMPLETIONS, b'{"prompt": ""}', "prompt must not be empty"),
    (COMPLETIONS, b'{"prompt": []}', "prompt"),
    (COMPLETIONS, b'{"prompt": [99999999]}', "prompt token ids"),
    (COMPLETIONS, b'{"prompt": {"text": "x"}}', "prompt"),
    (COMPLETIONS, b'{"max_tokens": 4}', "prompt"),
    (COMPLETIONS, b'{"prompt": "x", "logit_bias": {"5": 10}}', "logit_bias is not supported"),
    (COMPLETIONS, b'{"prompt": "x", "best_of": 2}', "best_of"),
    (COMPLETIONS, b'{"prompt": "x", "suffix": "s"}', "suffix"),
    (COMPLETIONS, b'{"prompt": "x", "temperature": 0.5, "speculation": {"acceptance": "greedy"}}',
     "requires temperature 0"),
    (CHAT, b'{"messages": "hi"}', "messages"),
    (CHAT, b'{"messages": []}', "messages"),
    (CHAT, b'{"messages": [{"role": "wizard", "content": "x"}]}', "role"),
    (CHAT, b'{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}',
     "tools"),
    (CHAT, b'{"messages": [{"role": "user", "content": "x"}], '
           b'"response_format": {"type": "json_object"}}', "response_format"),
    (CHAT, b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 5000}', "1024"),
])
def test_bad_requests_are_400(server_url, path, body, contains):
    r = httpx.post(server_url + path, content=body,
                   headers={"content-type": "application/json"})
    assert_error(r, 400, contains=contains)


def test_prompt_too_long_names_both_lengths(server_url, server):
    ids = [100] * 1000
    r = httpx.post(server_url + COMPLETIONS, json={"prompt": ids, "max_tokens": 100})
    err = assert_error(r, 400, code="context_length_exceeded")
    assert "1024" in err["message"] and "1000" in err["message"]
    long_text = "hello " * 3000
    r = httpx.post(server_url + CHAT, json={
        "messages": [{"role": "user", "content": long_text}]})
    err = assert_error(r, 400, code="context_length_exceeded")
    assert "1024" in err["message"]


def test_openai_client_sees_bad_request(server_url, model_name):
    client = openai.OpenAI(base_url=server_url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model_name, prompt="x", max_tokens=4,
                                  logit_bias={"10": 5})
    assert "logit_bias" in str(info.value)


def test_unknown_model_is_404(server_url):
    r = httpx.post(server_url + COMPLETIONS, json={"model": "gpt-4o", "prompt": "x"})
    assert_error(r, 404, code="model_not_found", contains="gpt-4o")
    r = httpx.post(server_url + CHAT, json={"model": "nope", "messages": [
        {"role": "user", "content": "x"}]})
    assert_error(r, 404, code="model_not_found")


def test_unknown_route_and_method(server_url):
    assert_error(httpx.get(server_url + "/v1/nothing"), 404)
    assert_error(httpx.post(server_url + "/v2/completions", json={}), 404)
    assert_error(httpx.get(server_url + COMPLETIONS), 405)


def test_body_too_large_is_413(server_url):
    big = json.dumps({"prompt": "x" * (1 << 20)}).encode()
    assert_error(httpx.post(server_url + COMPLETIONS, content=big), 413,
                 code="request_too_large")

    def chunks():  # no Content-Length: the middleware counts streamed bytes
        yield b'{"prompt": "'
        for _ in range(20):
            yield b"y" * 65536
        yield b'"}'
    assert_error(httpx.post(server_url + COMPLETIONS, content=chunks()), 413)
    # the server is fine afterwards
    assert httpx.get(server_url + "/health").status_code == 200


def test_api_key(make_server, model_name):
    srv = make_server(ServerSettings(api_key="s3cret-key"))
    url = srv.url
    assert_error(httpx.post(url + COMPLETIONS, json={"prompt": "x"}), 401,
                 code="invalid_api_key")
    assert_error(httpx.post(url + COMPLETIONS, json={"prompt": "x"},
                            headers={"Authorization": "Bearer wrong"}), 401)
    assert_error(httpx.get(url + "/v1/models", headers={"Authorization": "s3cret-key"}), 401)
    # 401 comes before body validation
    assert_error(httpx.post(url + COMPLETIONS, content=b"{bad"), 401)
    # open endpoints
    assert httpx.get(url + "/health").status_code == 200
    assert httpx.get(url + "/metrics").status_code == 200
    bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret-key", max_retries=0)
    r = good.completions.create(model=model_name, prompt="Hi", max_tokens=2, temperature=0)
    assert r.usage.completion_tokens >= 1


def test_queue_full_is_429_and_accepted_requests_stay_intact(make_server, server_url,
                                                             model_name):
    prompts = [f"Count from {i} to {i + 5}:" for i in range(8)]
    expected = {}
    for p in prompts:
        r = httpx.post(server_url + COMPLETIONS, json={
            "model": model_name, "prompt": p, "max_tokens": 8, "temperature": 0}, timeout=120)
        expected[p] = r.json()["choices"][0]["text"]

    tiny = make_server(ServerSettings(max_num_seqs=1, max_queued=1))
    results: dict[int, tuple[int, str, dict]] = {}
    barrier = threading.Barrier(len(prompts))

    def one(i: int) -> None:
        body = {"model": model_name, "prompt": prompts[i], "max_tokens": 8, "temperature": 0,
                "stream": i % 2 == 1}
        barrier.wait()
        with httpx.Client(timeout=120) as c:
            with c.stream("POST", tiny.url + COMPLETIONS, json=body) as r:
                if r.status_code != 200:
                    r.read()
                    results[i] = (r.status_code, "", {"json": r.json(), "headers": r.headers})
                elif body["stream"]:
                    events = sse_events(r)
                    assert events[-1] == "[DONE]"
                    text = "".join(e["choices"][0]["text"] for e in events[:-1])
                    results[i] = (200, text, {})
                else:
                    r.read()
                    results[i] = (200, r.json()["choices"][0]["text"], {})

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert len(results) == len(prompts)  # nothing lost
    statuses = [results[i][0] for i in range(len(prompts))]
    assert 429 in statuses and 200 in statuses, statuses
    for i, (status, text, extra) in results.items():
        if status == 200:
            assert text == expected[prompts[i]]  # nothing mixed up between requests
        else:
            assert status == 429
            assert extra["headers"]["retry-after"] == "1"
            assert extra["json"]["error"]["code"] == "rate_limit_exceeded"
    # capacity comes back
    r = httpx.post(tiny.url + COMPLETIONS, json={"prompt": prompts[0], "max_tokens": 8,
                                                 "temperature": 0}, timeout=120)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected[prompts[0]]


def test_client_errors_never_500(server_url):
    """A small fuzz over field types: every answer is 400 with the error schema."""
    values = [None, True, -1, 0, 1.5, 1e300, "x", "", [], [None], {}, {"a": 1}, [[]],
              [-3], ["a", 1], "\u0000"]
    fields = ["prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "logprobs",
              "echo", "stream", "top_k", "ignore_eos", "speculation", "stream_options",
              "presence_penalty"]
    for field in fields:
        for v in values:
            body = {"prompt": "Hi", "max_tokens": 1, "temperature": 0}
            body[field] = v
            r = httpx.post(server_url + COMPLETIONS, json=body, timeout=120)
            assert r.status_code in (200, 400), (field, v, r.status_code, r.text)
            if r.status_code == 400:
                assert_error(r, 400)
            elif body.get("stream") is True:
                assert r.text.rstrip().endswith("data: [DONE]")
