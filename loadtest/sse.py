"""Server-sent events: line decoding and interpretation of OpenAI stream chunks.

Pure functions; no I/O. ``SSEDecoder`` turns lines into event payloads (the joined
``data:`` fields of one event), ``parse_chunk`` turns one decoded JSON chunk of
``/v1/chat/completions`` or ``/v1/completions`` into a ``Chunk``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .records import TokenLogprob

DONE = "[DONE]"


def _is_complete(payload: str) -> bool:
    if payload.strip() == DONE:
        return True
    try:
        json.loads(payload)
    except ValueError:
        return False
    return True


def _as_error(value: str) -> str:
    """Payload of an error event as ``{"error": ...}`` JSON."""
    try:
        obj: Any = json.loads(value)
    except ValueError:
        obj = value
    if isinstance(obj, dict) and "error" in obj:
        return value
    return json.dumps({"error": obj})


class SSEDecoder:
    """Incremental SSE decoder. Feed it lines without their newline; it returns the
    payloads of events completed by that line. Comment lines (``:``) and fields other
    than ``data``/``event``/``error`` are ignored. Errors arrive as ``{"error": ...}``
    payloads whether the server sent them as data, as an ``event: error`` event, or
    as an ``error:`` line (llama.cpp server). Servers that omit the blank line between
    events are tolerated: a new ``data:`` line after a complete JSON payload starts a
    new event."""

    def __init__(self) -> None:
        self._data: list[str] = []
        self._event = ""

    def feed_line(self, line: str) -> list[str]:
        line = line.rstrip("\r\n")
        if not line:
            return self._flush()
        if line.startswith(":"):
            return []
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
            return []
        if name == "error":
            return self._flush() + [_as_error(value)]
        if name != "data":
            return []
        out = self._flush() if self._data and _is_complete("\n".join(self._data)) else []
        self._data.append(value)
        return out

    def close(self) -> list[str]:
        """End of stream: return a last event not terminated by a blank line."""
        return self._flush()

    def _flush(self) -> list[str]:
        event, self._event = self._event, ""
        if not self._data:
            return []
        payload = "\n".join(self._data)
        self._data = []
        return [_as_error(payload) if event == "error" else payload]


@dataclass(slots=True)
class Chunk:
    """The parts of one stream chunk the load tester uses."""

    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    completion_tokens: int | None = None   # usage.completion_tokens carried by this chunk
    logprobs: list[TokenLogprob] | None = None
    spec: dict[str, Any] | None = None     # metrics.speculative_decoding
    error: str | None = None

    @property
    def logprob_tokens(self) -> int | None:
        return None if self.logprobs is None else len(self.logprobs)


def _chat_logprobs(lp: Any) -> list[TokenLogprob] | None:
    if not isinstance(lp, dict) or not isinstance(lp.get("content"), list):
        return None
    out = []
    for entry in lp["content"]:
        top = [(str(t.get("token", "")), float(t["logprob"]))
               for t in entry.get("top_logprobs") or [] if t.get("logprob") is not None]
        top.sort(key=lambda x: -x[1])
        out.append(TokenLogprob(str(entry.get("token", "")), entry.get("logprob"), top))
    return out


def _completion_logprobs(lp: Any) -> list[TokenLogprob] | None:
    if not isinstance(lp, dict) or not isinstance(lp.get("tokens"), list):
        return None
    tokens = lp["tokens"]
    lps = lp.get("token_logprobs") or [None] * len(tokens)
    tops = lp.get("top_logprobs") or [None] * len(tokens)
    out = []
    for tok, tok_lp, top in zip(tokens, lps, tops):
        alts = sorted(((str(k), float(v)) for k, v in (top or {}).items() if v is not None),
                      key=lambda x: -x[1])
        out.append(TokenLogprob(str(tok), tok_lp, alts))
    return out


def _error_message(err: Any) -> str:
    if isinstance(err, dict):
        return str(err.get("message") or err.get("type") or err)
    return str(err)


def parse_chunk(obj: Any) -> Chunk:
    """Interpret one decoded chunk (chat or completions shape; both are accepted)."""
    if not isinstance(obj, dict):
        return Chunk(error=f"unexpected chunk: {obj!r}"[:200])
    chunk = Chunk()
    if obj.get("error") is not None:
        chunk.error = _error_message(obj["error"])
        return chunk
    if obj.get("object") == "error":  # older vLLM: an ErrorResponse as the chunk
        chunk.error = str(obj.get("message") or obj)
        return chunk
    texts: list[str] = []
    for choice in obj.get("choices") or []:
        delta = choice.get("delta")
        if isinstance(delta, dict):  # chat
            texts.append(delta.get("reasoning_content") or "")
            texts.append(delta.get("content") or "")
            lps = _chat_logprobs(choice.get("logprobs"))
        else:  # completions
            texts.append(choice.get("text") or "")
            lps = _completion_logprobs(choice.get("logprobs"))
        if lps is not None:
            chunk.logprobs = (chunk.logprobs or []) + lps
        if choice.get("finish_reason"):
            chunk.finish_reason = choice["finish_reason"]
    chunk.text = "".join(texts)
    usage = obj.get("usage")
    if isinstance(usage, dict):
        chunk.usage = usage
        if isinstance(usage.get("completion_tokens"), int):
            chunk.completion_tokens = usage["completion_tokens"]
    metrics = obj.get("metrics")
    if not isinstance(metrics, dict) and isinstance(usage, dict):
        metrics = usage.get("metrics")
    if isinstance(metrics, dict) and isinstance(metrics.get("speculative_decoding"), dict):
        chunk.spec = metrics["speculative_decoding"]
    return chunk
