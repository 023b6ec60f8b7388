"""Every limit is named and enforced, and hostile bodies are refused quickly and cleanly.

Limits: body size (--max-body-bytes, 413), prompt + max_tokens within the context (400
context_length_exceeded), max_tokens (--max-tokens-limit), n (8), stop strings (4, of at
most 1024 characters), sequences per request (prompts x n, the admission capacity),
logprobs (5 / 20), sequences in flight (429, see test_faults.py). Each refusal is 4xx in
OpenAI's error schema and its message names the limit's value; the value itself is
accepted. Hostile input: deep JSON, enormous strings, wrong content types, huge numbers,
lone surrogates, NUL bytes, tens of thousands of messages.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from mtpserve.server.app import ServerSettings

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
BODY_LIMIT = 64 * 1024
TOKENS_LIMIT = 8


@pytest.fixture(scope="module")
def lim(make_server):
    return make_server(ServerSettings(max_body_bytes=BODY_LIMIT, max_tokens_limit=TOKENS_LIMIT))


def post(url: str, path: str, body, **headers) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url + path, content=content, timeout=60,
                      headers={"content-type": "application/json", **headers})


def refused(r: httpx.Response, status: int, *names: str, code: str | None = None) -> dict:
    assert r.status_code == status, r.text[:500]
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    err = body["error"]
    for name in names:
        assert name in err["message"], (name, err["message"])
    if code is not None:
        assert err["code"] == code, err
    return err


def ok(r: httpx.Response) -> dict:
    assert r.status_code == 200, r.text[:500]
    return r.json()


def chat(content: str = "Hi", **kw) -> dict:
    return {"messages": [{"role": "user", "content": content}], "temperature": 0, **kw}


def test_body_size_limit(lim):
    pad = BODY_LIMIT - len(json.dumps({"prompt": "x", "user": ""}))
    just = {"prompt": "x", "user": "u" * pad, "max_tokens": 1}
    refused(post(lim.url, COMPLETIONS, {**just, "user": "u" * (pad + 1)}), 413, str(BODY_LIMIT),
            code="request_too_large")
    ok(post(lim.url, COMPLETIONS, {**just, "user": "u" * (pad - 20)}))


def test_context_limit_names_both_lengths_and_accepts_the_boundary(lim):
    ctx = lim.state.max_model_len
    err = refused(post(lim.url, COMPLETIONS, {"prompt": [100] * (ctx - 1), "max_tokens": 2}),
                  400, str(ctx), str(ctx - 1), code="context_length_exceeded")
    assert err["param"] == "max_tokens"
    r = ok(post(lim.url, COMPLETIONS, {"prompt": [100] * (ctx - 1), "max_tokens": 1,
                                       "temperature": 0}))
    assert r["usage"] == {"prompt_tokens": ctx - 1, "completion_tokens": 1,
                          "total_tokens": ctx}


def test_max_tokens_limit(lim):
    over = TOKENS_LIMIT + 1
    err = refused(post(lim.url, COMPLETIONS, {"prompt": "Hi", "max_tokens": over}), 400,
                  str(TOKENS_LIMIT), "--max-tokens-limit", code="max_tokens_exceeded")
    assert err["param"] == "max_tokens"
    err = refused(post(lim.url, CHAT, chat(max_completion_tokens=over)), 400, str(TOKENS_LIMIT))
    assert err["param"] == "max_completion_tokens"
    r = ok(post(lim.url, COMPLETIONS, {"prompt": "Hi", "max_tokens": TOKENS_LIMIT,
                                       "ignore_eos": True, "temperature": 0}))
    assert r["usage"]["completion_tokens"] == TOKENS_LIMIT
    # omitted: the cap, not the rest of the context
    r = ok(post(lim.url, CHAT, chat(ignore_eos=True)))
    assert r["usage"]["completion_tokens"] == TOKENS_LIMIT
    r = ok(post(lim.url, COMPLETIONS, {"prompt": "Hi", "ignore_eos": True, "temperature": 0}))
    assert r["usage"]["completion_tokens"] == TOKENS_LIMIT


def test_n_stop_and_logprobs_limits(lim):
    refused(post(lim.url, COMPLETIONS, {"prompt": "Hi", "n": 9}), 400, "n", "8")
    r = ok(post(lim.url, COMPLETIONS, {"prompt": "Hi", "n": 8, "max_tokens": 1}))
    assert len(r["choices"]) == 8
    refused(post(lim.url, CHAT, chat(stop=["a", "b", "c", "d", "e"])), 400, "stop", "4")
    refused(post(lim.url, CHAT, chat(stop="s" * 1025)), 400, "stop", "1024")
    refused(post(lim.url, COMPLETIONS, {"prompt": "Hi", "stop": ["s" * 1025]}), 400, "1024")
    ok(post(lim.url, CHAT, chat(stop=["s" * 1024, "t" * 1024, "u", "v"], max_tokens=2)))
    refused(post(lim.url, COMPLETIONS, {"prompt": "Hi", "logprobs": 6}), 400, "logprobs", "5")
    refused(post(lim.url, CHAT, chat(logprobs=True, top_logprobs=21)), 400, "top_logprobs",
            "20")


def test_sequences_per_request_limit(lim):
    limit = lim.state.max_seqs_per_request
    assert limit == lim.state.client.capacity  # --max-num-seqs + --max-queued
    prompts = [[100, 101]] * (limit // 8 + 1)  # x n=8: over by a few
    t0 = time.monotonic()
    err = refused(post(lim.url, COMPLETIONS, {"prompt": prompts, "n": 8}), 400, str(limit),
                  code="too_many_sequences")
    assert err["param"] == "prompt"
    many = [f"prompt {i}" for i in range(3_000)]  # refused before tokenizing any of them
    refused(post(lim.url, COMPLETIONS, {"prompt": many, "max_tokens": 1}), 400, str(limit))
    assert time.monotonic() - t0 < 5


# -- hostile input ---------------------------------------------------------------------


def test_deep_json_is_400(server_url):
    for body in ('{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}",
                 '{"prompt": "x", "user": ' + '{"a":' * 50_000 + "1" + "}" * 50_000 + "}",
                 '{"messages": [' + "[" * 10_000 + "]" * 10_000 + "]}"):
        path = CHAT if body.startswith('{"messages"') else COMPLETIONS
        refused(post(server_url, path, body.encode()), 400, "JSON", code="invalid_json")


def test_enormous_strings(server_url, model_name):
    big = "lorem ipsum " * 80_000  # ~960 KB, under the 1 MiB body limit
    t0 = time.monotonic()
    refused(post(server_url, COMPLETIONS, {"prompt": big}), 400, code="context_length_exceeded")
    refused(post(server_url, CHAT, chat(big)), 400, code="context_length_exceeded")
    assert time.monotonic() - t0 < 20
    # echoed client text is cut short in messages
    err = refused(post(server_url, COMPLETIONS, {"model": "m" * 100_000, "prompt": "x"}), 404,
                  code="model_not_found")
    assert len(err["message"]) < 400
    err = refused(post(server_url, CHAT, {"messages": [{"role": "r" * 100_000,
                                                        "content": "x"}]}), 400)
    assert len(err["message"]) < 400
    # an enormous field the server ignores is fine
    ok(post(server_url, COMPLETIONS, {"model": model_name, "prompt": "Hi", "max_tokens": 1,
                                      "user": "u" * 900_000}))


def test_content_types(server_url):
    body = json.dumps({"prompt": "Hi", "max_tokens": 1}).encode()
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                  "application/xml"):
        refused(httpx.post(server_url + COMPLETIONS, content=body,
                           headers={"content-type": ctype}), 415, ctype, "application/json",
                code="unsupported_media_type")
    for ctype in ("application/json", "application/json; charset=utf-8", "Application/JSON",
                  "application/vnd.api+json"):
        ok(httpx.post(server_url + COMPLETIONS, content=body, headers={"content-type": ctype},
                      timeout=60))
    ok(httpx.post(server_url + COMPLETIONS, content=body, timeout=60))  # no content-type


@pytest.mark.parametrize("body, contains", [
    (b'{"prompt": "x", "max_tokens": 1e400}', "max_tokens"),
    (b'{"prompt": "x", "max_tokens": 18446744073709551617}', "max_tokens"),
    (b'{"prompt": "x", "seed": 18446744073709551616}', "seed"),
    (b'{"prompt": "x", "n": 1e20}', "n"),
    (b'{"prompt": "x", "temperature": -0.0000001}', "temperature"),
    (b'{"prompt": "x", "top_p": 0}', "top_p"),
    (b'{"prompt": "\\ud800"}', "JSON"),
    (b'{"messages": [{"role": "user", "content": "\\udfff"}]}', "JSON"),
    (b'{"prompt": "x", "stop": ["\\ud800"]}', "JSON"),
    (b'\xef\xbb\xbf{"prompt": "x"}', "JSON"),  # a UTF-8 byte order mark
    (b'{"prompt": "x"} trailing', "JSON"),
    (b'{"prompt": "x", "max_tokens": NaN}', "max_tokens"),
])
def test_hostile_values_are_400(server_url, body, contains):
    path = CHAT if b"messages" in body else COMPLETIONS
    refused(post(server_url, path, body), 400, contains)


def test_tiny_temperature_and_top_p_decode_without_engine_errors(server_url):
    """float32 cannot divide logits by 1e-40 or compare with top_p 1e-46: the server sends
    the limits these values approach (greedy; the top token alone)."""
    greedy = ok(post(server_url, COMPLETIONS, {"prompt": "The sky is", "max_tokens": 3,
                                               "temperature": 0}))["choices"][0]["text"]
    for extra in ({"temperature": 1e-40}, {"top_p": 1e-46}, {"temperature": 5e-324},
                  {"top_p": 5e-324, "temperature": 1.5}):
        r = ok(post(server_url, COMPLETIONS, {"prompt": "The sky is", "max_tokens": 3,
                                              "seed": 1, **extra}))
        assert r["choices"][0]["text"] == greedy, extra


def test_nul_bytes_and_many_messages(server_url, model_name):
    ok(post(server_url, COMPLETIONS, {"prompt": "a\u0000b", "max_tokens": 1}))
    ok(post(server_url, CHAT, chat("\u0000" * 200, max_tokens=1)))
    # 20k messages: rendered off the event loop, so /health answers meanwhile
    many = {"messages": [{"role": "user", "content": "hi"}] * 20_000}
    result: dict = {}

    def send() -> None:
        result["r"] = post(server_url, CHAT, many)

    t = threading.Thread(target=send)
    t.start()
    health = []
    while t.is_alive():
        t0 = time.monotonic()
        assert httpx.get(server_url + "/health", timeout=10).status_code == 200
        health.append(time.monotonic() - t0)
        time.sleep(0.05)
    t.join()
    refused(result["r"], 400, code="context_length_exceeded")
    assert max(health) < 1.0, health
