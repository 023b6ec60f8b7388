"""Schema fuzzing: schemathesis generates requests from the server's own /openapi.json.

Every operation gets valid and invalid cases (wrong types, out-of-range and huge numbers,
empty and long strings, missing and extra fields). Each response must be documented:
no 5xx, a documented status and content type, a body matching its schema (errors in
OpenAI's schema, no other keys), every SSE event a JSON chunk or error and the stream
ending with [DONE], no schema-invalid request accepted, and no case slower than
MAX_RESPONSE_S; other methods on each path get 405 with Allow. Afterwards the server is healthy, idle and still
gives the same greedy answer.

The fuzzed server caps max_tokens at 2 (`max_tokens_limit`, advertised in the document),
so valid cases generate at most 2 tokens and larger values must be refused at once.
Deterministic (derandomized): per operation 15 valid cases, per POST operation 50
invalid ones (about 130 in all); FUZZ_SCALE multiplies both.
scripts/fuzz.sh runs the longer version (coverage phase included) on a real process.
"""

from __future__ import annotations

import json
import os
import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode

from mtpserve.server.app import ServerSettings
from mtpserve.server.openapi import ERROR_SCHEMA
from server_helpers import scrape, wait_idle

# cases per operation: valid ones may generate (up to n=8 sequences), invalid ones are cheap
SCALE = float(os.environ.get("FUZZ_SCALE", "1"))
EXAMPLES = {"valid": int(15 * SCALE), "invalid": int(50 * SCALE)}
MAX_RESPONSE_S = 30.0
TOKENS_CAP = 2
SEEN: dict[str, int] = {}  # status class -> cases, for the summary line

CONFIG = schemathesis.Config.from_dict({
    "seed": 20251,
    "generation": {"mode": "all", "database": "none"},
    "phases": {"coverage": {"enabled": False}, "examples": {"enabled": False}},
    # every built-in response check except positive_data_acceptance: rules across fields
    # (best_of == n, top_logprobs needs logprobs, prompt + max_tokens within the context)
    # are not in the document, so some schema-valid cases are rightly refused with 400
    "checks": {"positive_data_acceptance": {"enabled": False},
               "max_response_time": MAX_RESPONSE_S},
})


@pytest.fixture(scope="module")
def fuzz_server(make_server):
    return make_server(ServerSettings(max_tokens_limit=TOKENS_CAP))


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    return schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json", config=CONFIG)


def _error_body_ok(body: object) -> None:
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == set(ERROR_SCHEMA["properties"]["error"]["required"]), err
    assert isinstance(err["message"], str) and err["message"], err
    assert err["type"] in ERROR_SCHEMA["properties"]["error"]["properties"]["type"]["enum"]


@schemathesis.check
def openai_error_schema(ctx, response, case) -> bool | None:
    """Every 4xx/5xx body is exactly OpenAI's error object."""
    if response.status_code >= 400:
        _error_body_ok(json.loads(response.content))
    return None


@schemathesis.check
def sse_stream_complete(ctx, response, case) -> bool | None:
    """A stream is JSON events (chunks or one error) ending with data: [DONE]."""
    if response.status_code != 200 or \
            not response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
        return None
    events = [line[len("data: "):] for line in response.content.decode().split("\n\n")
              if line.strip()]
    assert events and events[-1] == "[DONE]", events[-3:]
    for raw in events[:-1]:
        event = json.loads(raw)
        if "error" in event:
            _error_body_ok(event)
            raise AssertionError(f"stream failed: {event}")  # valid input must not fail
        assert event["object"] in ("text_completion", "chat.completion.chunk"), event
    return None


OPERATIONS = ["POST /v1/completions", "POST /v1/chat/completions", "GET /v1/models",
              "GET /health", "GET /metrics"]


def test_document_lists_every_route(api_schema):
    labels = sorted(r.ok().label for r in api_schema.get_all_operations())
    assert labels == sorted(OPERATIONS)


def test_other_methods_are_405_with_allow(fuzz_server):
    for label in OPERATIONS:
        method, path = label.split()
        for other in ("GET", "POST", "PUT", "DELETE", "PATCH"):
            if other == method:
                continue
            r = httpx.request(other, fuzz_server.url + path, json={})
            assert r.status_code == 405, (other, path, r.status_code)
            assert method in r.headers["allow"]
            _error_body_ok(r.json())


CASES = [(label, GenerationMode.POSITIVE) for label in OPERATIONS] + \
    [(label, GenerationMode.NEGATIVE) for label in OPERATIONS[:2]]  # GETs take no input


@pytest.mark.parametrize("label, mode", CASES, ids=[
    f"{'valid' if m is GenerationMode.POSITIVE else 'invalid'}-{label}" for label, m in CASES])
def test_openapi_fuzz(api_schema, label, mode):
    kind = "valid" if mode is GenerationMode.POSITIVE else "invalid"
    operation = api_schema.find_operation_by_label(label)
    assert operation is not None
    checks = [openai_error_schema, sse_stream_complete]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES[kind], derandomize=True, database=None, deadline=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    def one(case):
        t0 = time.monotonic()
        response = case.call(timeout=MAX_RESPONSE_S)
        elapsed = time.monotonic() - t0
        for key in (f"{response.status_code // 100}xx", kind):
            SEEN[key] = SEEN.get(key, 0) + 1
        case.validate_response(response, additional_checks=checks)
        assert elapsed < MAX_RESPONSE_S
        if os.environ.get("FUZZ_TRACE"):
            print(f"{elapsed:.2f}s {response.status_code} {response.content[:150]!r} "
                  f"{case.body!r:.400}")

    one()


def test_server_healthy_and_idle_after_fuzzing(fuzz_server, server_url):
    """Run after the fuzz cases (file order): nothing stuck, nothing leaked, same answers."""
    # the cases really ran
    assert SEEN.get("invalid", 0) >= EXAMPLES["invalid"], SEEN
    assert SEEN.get("valid", 0) >= 2 * EXAMPLES["valid"], SEEN
    assert SEEN.get("2xx", 0) > 0 and SEEN.get("4xx", 0) > 0, SEEN
    assert SEEN.get("5xx", 0) == 0, SEEN
    url = fuzz_server.url
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    wait_idle(url, timeout=30)
    assert scrape(url)[("mtpserve_kv_cache_usage_ratio", ())] == 0
    assert fuzz_server.state.client.inflight == 0
    body = {"prompt": "The capital of France is", "max_tokens": 2, "temperature": 0}
    a = httpx.post(url + "/v1/completions", json=body, timeout=60)
    b = httpx.post(server_url + "/v1/completions", json=body, timeout=60)
    assert a.status_code == b.status_code == 200
    assert a.json()["choices"][0]["text"] == b.json()["choices"][0]["text"]
    print(f"\nfuzzed {SEEN['valid'] + SEEN['invalid']} cases over 5 operations: {SEEN}")
