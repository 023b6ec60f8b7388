"""Pure tests: request schema validation and error phrasing (no engine)."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from mtpserve.server import protocol as p
from mtpserve.server.errors import validation_error_to_api


def parse(model, body):
    raw = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return model.model_validate_json(raw)


def api_error(model, body):
    with pytest.raises(ValidationError) as info:
        parse(model, body)
    return validation_error_to_api(info.value.errors())


@pytest.mark.parametrize("prompt, expected", [
    ("hi", ["hi"]),
    (["a", "b"], ["a", "b"]),
    ([1, 2, 3], [[1, 2, 3]]),
    ([[1, 2], [3]], [[1, 2], [3]]),
])
def test_prompt_shapes(prompt, expected):
    assert parse(p.CompletionRequest, {"prompt": prompt}).prompts() == expected


def test_defaults_and_extensions():
    req = parse(p.CompletionRequest, {
        "model": "m", "prompt": "x", "top_k": 5, "ignore_eos": True,
        "speculation": {"enabled": False, "acceptance": "rejection"},
        "some_future_field": {"whatever": 1}})
    assert req.max_tokens == 16 and req.n == 1 and req.top_k == 5 and req.ignore_eos
    assert req.speculation.enabled is False and req.speculation.acceptance == "rejection"
    chat = parse(p.ChatCompletionRequest, {
        "messages": [{"role": "developer", "content": "be brief"},
                     {"role": "user", "content": [{"type": "text", "text": "a"},
                                                  {"type": "text", "text": "b"}]}],
        "max_completion_tokens": 7, "stream": True, "stream_options": {"include_usage": True},
        "logprobs": True, "top_logprobs": 3, "response_format": {"type": "text"}})
    assert chat.requested_max_tokens == 7 and chat.include_usage
    assert [m.to_template_dict() for m in chat.messages] == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "a\nb"}]


@pytest.mark.parametrize("body, fragment", [
    ({"prompt": "x", "max_tokens": "10"}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 1.5}, "max_tokens"),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "temperature": 2.5}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": 9}, "n"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "seed": 2**70}, "seed"),
    ({"prompt": "x", "logprobs": 6}, "logprobs"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "x", "stop": [""]}, "stop strings must be non-empty"),
    ({"prompt": "x", "logit_bias": {"1": 5}}, "logit_bias is not supported"),
    ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"prompt": "x", "suffix": "tail"}, "suffix is not supported"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens must be at least 1"),
    ({"prompt": "x", "echo": True, "logprobs": 1}, "echo together with logprobs"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "x", "speculation": {"acceptance": "greedy"}}, "requires temperature 0"),
    ({"prompt": "x", "temperature": 0.7, "speculation": {"acceptance": "greedy"}},
     "requires temperature 0"),
    ({"prompt": "x", "speculation": {"acceptance": "fast"}}, "speculation.acceptance"),
    ({"prompt": "x", "speculation": {"typical_epsilon": 2}}, "typical_epsilon"),
    ({"prompt": "x", "top_k": -2}, "top_k"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": [-1]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({}, "prompt: field required"),
])
def test_completion_request_errors(body, fragment):
    err = api_error(p.CompletionRequest, body)
    assert err.status_code == 400
    assert fragment in err.message, err.message


@pytest.mark.parametrize("body, fragment", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "role 'tool' is not supported"),
    ({"messages": [{"role": "user"}]}, "needs content"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "content part type 'image_url' is not supported"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
     "tools"),
    ({"messages": [{"role": "user", "content": "x"}], "tool_choice": "auto"}, "tool_choice"),
    ({"messages": [{"role": "user", "content": "x"}],
      "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "requires logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
     "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
])
def test_chat_request_errors(body, fragment):
    err = api_error(p.ChatCompletionRequest, body)
    assert err.status_code == 400
    assert fragment in err.message, err.message


@pytest.mark.parametrize("raw, code", [
    (b"{not json", "invalid_json"),
    (b'{"prompt": "\xff\xfe"}', "invalid_json"),
    (b"[1, 2]", "invalid_json"),
    (b'"just a string"', "invalid_json"),
])
def test_malformed_bodies(raw, code):
    err = api_error(p.CompletionRequest, raw)
    assert err.status_code == 400 and err.code == code


def test_nan_and_infinity_rejected():
    err = api_error(p.CompletionRequest, b'{"prompt": "x", "temperature": NaN}')
    assert err.param == "temperature"
    err = api_error(p.CompletionRequest, b'{"prompt": "x", "top_p": 1e999}')
    assert err.param == "top_p"


def test_dump_chunk_drops_unset_delta_keys_and_metrics():
    chunk = p.ChatCompletionStreamResponse(id="c", model="m", choices=[
        p.ChatStreamChoice(index=0, delta=p.DeltaMessage(content="hi"))])
    text = p.dump_chunk(chunk)
    assert text.startswith("data: ") and text.endswith("\n\n")
    data = json.loads(text[6:])
    assert data["choices"][0]["delta"] == {"content": "hi"}
    assert "metrics" not in data and data["choices"][0]["finish_reason"] is None
