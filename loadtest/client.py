"""One streaming request to an OpenAI-compatible server -> ``RequestRecord``.

Every request streams (``stream: true`` with ``stream_options.include_usage``) and is
bounded by ``RequestConfig.timeout_s`` from send to the end of the stream.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from .config import Arm, RequestConfig, deep_merge
from .records import RequestRecord, TokenLogprob
from .sse import DONE, SSEDecoder, parse_chunk
from .timing import TimedEvent, attribute_tokens, compute_latencies
from .workloads import Prompt


def build_body(arm: Arm, prompt: Prompt, cfg: RequestConfig, *,
               top_logprobs: int | None = None) -> dict[str, Any]:
    """Request body: standard fields, then --extra-body, then the arm's extra body."""
    body: dict[str, Any] = {
        "model": arm.model,
        "max_tokens": prompt.max_tokens or cfg.max_tokens,
        "temperature": cfg.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if cfg.endpoint == "chat":
        body["messages"] = prompt.chat_messages()
    else:
        body["prompt"] = prompt.completion_prompt()
    if cfg.seed is not None:
        body["seed"] = cfg.seed
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    if top_logprobs is None:
        top_logprobs = cfg.top_logprobs
    if top_logprobs is not None:
        if cfg.endpoint == "chat":
            body.update(logprobs=True, top_logprobs=top_logprobs)
        else:
            body["logprobs"] = top_logprobs
    return deep_merge(deep_merge(body, cfg.extra_body), arm.extra_body)


def endpoint_url(arm: Arm, cfg: RequestConfig) -> str:
    path = "/chat/completions" if cfg.endpoint == "chat" else "/completions"
    return arm.api_root + path


class _RequestFailed(Exception):
    def __init__(self, error_type: str, detail: str) -> None:
        super().__init__(detail)
        self.error_type = error_type
        self.detail = detail


@dataclass
class _StreamState:
    events: list[TimedEvent] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    usage: dict[str, Any] | None = None
    spec: dict[str, Any] | None = None
    finish_reason: str | None = None
    status_code: int | None = None
    retry_after_s: float | None = None
    got_headers: bool = False
    done: bool = False


def _retry_after(resp: httpx.Response) -> float | None:
    try:
        return float(resp.headers["retry-after"])
    except (KeyError, ValueError):
        return None


def _status_error_type(status: int) -> str:
    if status == 429:
        return "http_429"
    return "http_5xx" if status >= 500 else "http_4xx"


def _handle_payload(payload: str, t: float, st: _StreamState) -> None:
    if payload.strip() == DONE:
        st.done = True
        return
    try:
        obj = json.loads(payload)
    except ValueError:
        raise _RequestFailed("bad_response", f"undecodable SSE data: {payload[:200]!r}")
    chunk = parse_chunk(obj)
    if chunk.error is not None:
        raise _RequestFailed("stream_error", chunk.error[:500])
    st.events.append(TimedEvent(t=t, text=chunk.text, usage_tokens=chunk.completion_tokens,
                                logprob_tokens=chunk.logprob_tokens))
    st.texts.append(chunk.text)
    if chunk.logprobs:
        st.logprobs.extend(chunk.logprobs)
    if chunk.usage is not None:
        st.usage = chunk.usage
    if chunk.spec is not None:
        st.spec = chunk.spec
    if chunk.finish_reason:
        st.finish_reason = chunk.finish_reason


async def _stream(http: httpx.AsyncClient, url: str, headers: dict[str, str],
                  body: dict[str, Any], st: _StreamState, t_send: float) -> None:
    async with http.stream("POST", url, json=body, headers=headers) as resp:
        st.status_code = resp.status_code
        st.got_headers = True
        if resp.status_code != 200:
            st.retry_after_s = _retry_after(resp)
            text = (await resp.aread())[:500].decode("utf-8", "replace")
            raise _RequestFailed(_status_error_type(resp.status_code),
                                 f"HTTP {resp.status_code}: {text}")
        decoder = SSEDecoder()
        async for line in resp.aiter_lines():
            t = time.perf_counter() - t_send
            for payload in decoder.feed_line(line):
                _handle_payload(payload, t, st)
            if st.done:
                return
        for payload in decoder.close():
            _handle_payload(payload, time.perf_counter() - t_send, st)
    if not st.done and st.finish_reason is None:
        raise _RequestFailed("incomplete_stream", "stream ended without [DONE]")


def _classify(exc: BaseException, st: _StreamState) -> tuple[str, str]:
    if isinstance(exc, _RequestFailed):
        return exc.error_type, exc.detail
    detail = f"{type(exc).__name__}: {exc}"[:500]
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError, httpx.TimeoutException)):
        return "timeout", detail
    if isinstance(exc, httpx.ConnectError):
        return "connect_error", detail
    if isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)):
        return ("connection_closed" if st.got_headers else "connect_error"), detail
    return "other", detail


async def send_request(http: httpx.AsyncClient, arm: Arm, prompt: Prompt,
                       cfg: RequestConfig, *, request_id: int = 0, level: str = "",
                       prompt_index: int = 0, level_t0: float | None = None,
                       top_logprobs: int | None = None) -> RequestRecord:
    """Send one streaming request and measure it. Never raises for request failures
    (they become ``error_type``); cancellation propagates."""
    body = build_body(arm, prompt, cfg, top_logprobs=top_logprobs)
    st = _StreamState()
    t_send = time.perf_counter()
    rec = RequestRecord(request_id=request_id, level=level, arm=arm.name, prompt_id=prompt.id,
                        prompt_index=prompt_index,
                        start_s=t_send - level_t0 if level_t0 is not None else 0.0)
    try:
        await asyncio.wait_for(_stream(http, endpoint_url(arm, cfg), arm.headers(), body,
                                       st, t_send), timeout=cfg.timeout_s)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure is classified and recorded
        rec.error_type, rec.error_detail = _classify(exc, st)
        if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
            rec.error_detail = f"no complete response within --timeout {cfg.timeout_s:g}s"
    rec.e2e_s = time.perf_counter() - t_send
    _finish(rec, st, collect_logprobs=top_logprobs is not None or cfg.top_logprobs is not None)
    return rec


def _finish(rec: RequestRecord, st: _StreamState, *, collect_logprobs: bool) -> None:
    rec.ok = rec.error_type is None
    rec.status_code = st.status_code
    rec.retry_after_s = st.retry_after_s
    total = st.usage.get("completion_tokens") if st.usage else None
    total = total if isinstance(total, int) else None
    counts, rec.token_count_source = attribute_tokens(st.events, total)
    lat = compute_latencies(st.events, counts)
    rec.ttft_s, rec.tpot_s, rec.itl_s = lat.ttft_s, lat.tpot_s, lat.itl_s
    rec.output_tokens = total if total is not None else lat.attributed_tokens
    if total is not None:
        rec.token_count_source = "+".join(x for x in ("usage", rec.token_count_source) if x)
    if st.usage and isinstance(st.usage.get("prompt_tokens"), int):
        rec.prompt_tokens = st.usage["prompt_tokens"]
    rec.num_events = len(st.events)
    rec.event_offsets_s = [e.t for e, n in zip(st.events, counts) if n > 0]
    rec.event_tokens = [n for n in counts if n > 0]
    rec.finish_reason = st.finish_reason
    rec.text = "".join(st.texts)
    rec.spec = st.spec
    if collect_logprobs:
        rec.token_logprobs = st.logprobs
