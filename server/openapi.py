"""The server's OpenAPI 3.1 document, served at `GET /openapi.json`.

Built from the same pydantic models that validate requests (protocol.py), so the document
cannot drift from what the server accepts, plus the server's live limits: the largest
max_tokens (context or --max-tokens-limit), the vocabulary for token-id prompts, prompts
per request. Every error status a route can answer is listed with OpenAI's error schema;
schema fuzzing (tests/server/test_fuzz_schema.py, scripts/fuzz.sh) holds the server to it.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from pydantic.json_schema import models_json_schema

from . import protocol as p

if TYPE_CHECKING:
    from .state import ServerState

REF = "#/components/schemas/{model}"

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "additionalProperties": False,
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type", "param", "code"],
        "additionalProperties": False,
        "properties": {
            "message": {"type": "string", "minLength": 1},
            "type": {"type": "string", "enum": [
                "invalid_request_error", "authentication_error", "rate_limit_error",
                "server_error", "service_unavailable_error"]},
            "param": {"type": ["string", "null"]},
            "code": {"type": ["string", "integer", "null"]},
        },
    }},
}

# one Server-Sent Event of a stream: a JSON chunk, an {"error": ...} object, or [DONE]
SSE_EVENT_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["data"],
    "properties": {"data": {"type": "string", "pattern": r"^(\[DONE\]|\{.*\})$"}},
}

HEALTH_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["status"], "additionalProperties": False,
    "properties": {"status": {"type": "string",
                              "enum": ["ok", "loading", "draining", "error"]}},
}

# what each error status means, per route kind
_ERRORS = {
    400: "invalid request: malformed JSON, wrong type, value out of range, a limit exceeded "
         "(the message names the limit and its value)",
    401: "missing or wrong API key (only when the server has one)",
    404: "unknown model",
    413: "request body over --max-body-bytes",
    415: "Content-Type other than application/json",
    429: "more sequences in flight than --max-num-seqs + --max-queued",
    500: "engine failure while generating (a server fault)",
    503: "the model is loading, or the server is draining",
}


def _error(code: int) -> dict[str, Any]:
    resp: dict[str, Any] = {
        "description": _ERRORS[code],
        "content": {"application/json": {"schema": {"$ref": REF.format(model="ErrorResponse")}}},
    }
    if code == 429:
        resp["headers"] = {"Retry-After": {"required": True, "schema": {"type": "string"}}}
    return resp


def _walk(node: Any, fn) -> None:
    """Call fn on every dict of a JSON schema, depth first."""
    if isinstance(node, dict):
        fn(node)
        for v in node.values():
            _walk(v, fn)
    elif isinstance(node, list):
        for v in node:
            _walk(v, fn)


def _cap_int(node: dict[str, Any], maximum: int) -> None:
    """Set `maximum` on the integer branch(es) of a field's schema."""
    def fn(d: dict[str, Any]) -> None:
        if d.get("type") == "integer":
            d["maximum"] = maximum
    _walk(node, fn)


def _nonempty_strings(node: dict[str, Any]) -> None:
    def fn(d: dict[str, Any]) -> None:
        if d.get("type") == "string":
            d["minLength"] = 1
    _walk(node, fn)


def _tighten(schemas: dict[str, Any]) -> None:
    """Single-field rules of the model validators that JSON Schema can say.

    Rules across fields (max_tokens 0 only with echo, stream_options only with stream,
    acceptance 'greedy' only at temperature 0, prompt + max_tokens within the context...)
    stay in the descriptions: the server answers them with 400.
    """
    empty_or_null = {"anyOf": [{"type": "object", "maxProperties": 0}, {"type": "null"}]}
    no_list = {"anyOf": [{"type": "array", "maxItems": 0}, {"type": "null"}]}
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        props = schemas[name]["properties"]
        props["logit_bias"] = {**empty_or_null, "description": "not supported: empty or null"}
        _nonempty_strings(props["stop"])
    cmpl = schemas["CompletionRequest"]["properties"]
    _nonempty_strings(cmpl["prompt"])
    cmpl["suffix"] = {"anyOf": [{"type": "string", "maxLength": 0}, {"type": "null"}],
                      "description": "not supported: empty or null"}
    chat = schemas["ChatCompletionRequest"]["properties"]
    for key in ("tools", "functions"):
        chat[key] = {**no_list, "description": "not supported: empty or null"}
    for key in ("tool_choice", "function_call"):
        chat[key] = {"enum": ["none", None], "description": "not supported: 'none' or null"}
    msg = schemas["ChatMessage"]
    content = msg["properties"]["content"]
    content["anyOf"] = [b for b in content["anyOf"] if b.get("type") != "null"]
    content.pop("default", None)
    msg["required"] = ["role", "content"]
    part = schemas["TextContentPart"]
    part["properties"]["text"] = {"type": "string"}
    part["required"] = ["type", "text"]


def _components(state: ServerState | None) -> dict[str, Any]:
    models = [(p.CompletionRequest, "validation"), (p.ChatCompletionRequest, "validation"),
              (p.CompletionResponse, "serialization"),
              (p.ChatCompletionResponse, "serialization"), (p.ModelList, "serialization"),
              (p.CompletionStreamResponse, "serialization"),
              (p.ChatCompletionStreamResponse, "serialization")]
    _, top = models_json_schema(models, ref_template=REF)
    schemas = copy.deepcopy(top["$defs"])
    schemas["ErrorResponse"] = ERROR_SCHEMA
    schemas["HealthStatus"] = HEALTH_SCHEMA
    _tighten(schemas)
    if state is not None and state.max_model_len:
        limit = state.max_tokens_limit
        cmpl = schemas["CompletionRequest"]["properties"]
        chat = schemas["ChatCompletionRequest"]["properties"]
        for field in (cmpl["max_tokens"], chat["max_tokens"], chat["max_completion_tokens"]):
            _cap_int(field, limit)
        cmpl["max_tokens"]["default"] = min(16, limit)
        if state.vocab_size:
            _cap_int(cmpl["prompt"], state.vocab_size - 1)

        def cap_prompts(d: dict[str, Any]) -> None:
            # a list of prompts (strings or token-id lists), not a list of token ids
            items = d.get("items", {})
            if d.get("type") == "array" and items.get("type") in ("string", "array"):
                d["maxItems"] = state.max_seqs_per_request
        _walk(cmpl["prompt"], cap_prompts)
        names = [state.model_name] + ([state.engine.model_name] if state.engine is not None
                                      and state.engine.model_name != state.model_name else [])
        for req in (cmpl, chat):
            req["model"] = {"enum": [*names, None], "description": "the served model"}
    return schemas


def _generation(op_id: str, summary: str, request: str, response: str) -> dict[str, Any]:
    ok = {
        "description": "the completion; an SSE stream (text/event-stream) when stream is true",
        "content": {
            "application/json": {"schema": {"$ref": REF.format(model=response)}},
            "text/event-stream": {"schema": SSE_EVENT_SCHEMA},
        },
    }
    return {"post": {
        "summary": summary,
        "operationId": op_id,
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": {"$ref": REF.format(model=request)}}}},
        "responses": {"200": ok, **{str(c): _error(c) for c in
                                    (400, 401, 404, 413, 415, 429, 500, 503)}},
    }}


def openapi_document(state: ServerState | None = None) -> dict[str, Any]:
    """The document for this server (limits filled in once the engine has loaded)."""
    health = {"content": {"application/json": {"schema": {
        "$ref": REF.format(model="HealthStatus")}}}}
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "mtpserve", "version": "0.1.0",
                 "description": "OpenAI-compatible completions with self-speculative "
                                "decoding. Errors follow OpenAI's schema."},
        "paths": {
            "/v1/completions": _generation("createCompletion", "Text completion",
                                           "CompletionRequest", "CompletionResponse"),
            "/v1/chat/completions": _generation("createChatCompletion", "Chat completion",
                                                "ChatCompletionRequest",
                                                "ChatCompletionResponse"),
            "/v1/models": {"get": {
                "summary": "The served model", "operationId": "listModels",
                "responses": {"200": {"description": "one model card", "content": {
                    "application/json": {"schema": {"$ref": REF.format(model="ModelList")}}}},
                    "401": _error(401), "503": _error(503)}}},
            "/health": {"get": {
                "summary": "Readiness", "operationId": "health",
                "responses": {"200": {"description": "ready", **health},
                              "503": {"description": "loading, draining or failed",
                                      **health}}}},
            "/metrics": {"get": {
                "summary": "Prometheus metrics", "operationId": "metrics",
                "responses": {"200": {"description": "Prometheus text format", "content": {
                    "text/plain": {"schema": {"type": "string"}}}}}}},
        },
        "components": {"schemas": _components(state)},
    }
    if state is not None and state.settings.api_key:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for path in ("/v1/completions", "/v1/chat/completions", "/v1/models"):
            for op in doc["paths"][path].values():
                op["security"] = [{"bearer": []}]
    return doc
