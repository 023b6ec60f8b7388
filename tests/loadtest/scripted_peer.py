"""A scripted OpenAI-compatible peer for testing the load tester's accounting.

It is a test double, not a model: output token i is the 5-character text `` w{i:03d}``
and everything (delays, failures, speculative grouping, /metrics counters) is known in
advance, so tests can check the reported numbers exactly.

Behaviour is chosen by directives ``[[key=value]]`` inside the prompt (last message for
chat) and by the request body:

``[[mode=ok]]`` (default) stream ``max_tokens`` tokens, first after TTFT_S, then one event
    every GAP_S; ``[[mode=429]]`` 429 with ``Retry-After: 2``; ``[[mode=503]]`` 503;
    ``[[mode=close]]`` drop the connection after 2 events; ``[[mode=hang]]`` send headers
    then nothing for HANG_S; ``[[mode=error_event]]`` one token then ``{"error": ...}``.
``[[eos=N]]`` stop after N tokens (finish_reason "stop") unless ``ignore_eos`` is true.
``[[diverge=J]]`` with speculation on, token J reads `` x{J:03d}`` instead.
Body ``{"speculation": {"enabled": true}}``: events carry SPEC_K tokens (one verification
    step: 2 accepted drafts + bonus), the final usage chunk carries a top-level
    ``metrics.speculative_decoding`` object, and the /metrics counters move per step by
    drafts +1, draft tokens +3, accepted +(tokens in step - 1), per position.
Body ``logprobs``: per-token logprobs (chat or completions shape): the chosen token at
    -0.1, one alternative at -0.1 - margin; margin NEAR_TIE_MARGIN at the diverge position
    else 3.0. ``stream_options.continuous_usage_stats``: usage on every chunk.
"""
from __future__ import annotations

import asyncio
import json
import re
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

MODEL_ID = "scripted-model"
TTFT_S = 0.05
GAP_S = 0.01
HANG_S = 3.0
SPEC_K = 3
NEAR_TIE_MARGIN = 0.05
RETRY_AFTER = "2"


def token_text(i: int, diverge: int | None = None) -> str:
    return f" x{i:03d}" if i == diverge else f" w{i:03d}"


@dataclass
class ServerState:
    metrics_enabled: bool = True
    counters: dict[str, float] = field(default_factory=dict)
    bodies: deque = field(default_factory=lambda: deque(maxlen=500))

    def inc(self, key: str, amount: float) -> None:
        self.counters[key] = self.counters.get(key, 0.0) + amount

    def spec_step(self, emitted: int) -> None:
        self.inc("drafts", 1)
        self.inc("draft_tokens", SPEC_K)
        self.inc("accepted", emitted - 1)
        for p in range(SPEC_K):
            self.inc(f"drafts_pos{p}", 1)
            self.inc(f"accepted_pos{p}", 1 if p < emitted - 1 else 0)

    def metrics_text(self) -> str:
        c = self.counters.get
        lines = []
        for base, key in (("num_drafts", "drafts"), ("num_draft_tokens", "draft_tokens"),
                          ("num_accepted_tokens", "accepted")):
            lines += [f"# HELP mtpserve_spec_decode_{base} scripted",
                      f"# TYPE mtpserve_spec_decode_{base} counter",
                      f"mtpserve_spec_decode_{base}_total {c(key, 0.0)}",
                      f"mtpserve_spec_decode_{base}_created 1.7e9",
                      f"# TYPE vllm:spec_decode_{base} counter",
                      f'vllm:spec_decode_{base}_total{{engine="0",model_name="{MODEL_ID}"}} '
                      f"{c(key, 0.0)}"]
        for base, key in (("num_accepted_tokens_per_pos", "accepted_pos"),
                          ("num_drafts_per_pos", "drafts_pos")):
            lines += [f"# TYPE mtpserve_spec_decode_{base} counter"]
            lines += [f'mtpserve_spec_decode_{base}_total{{position="{p}"}} {c(key + str(p), 0.0)}'
                      for p in range(SPEC_K)]
        lines += ["# TYPE vllm:spec_decode_num_accepted_tokens_per_pos counter"]
        lines += [f'vllm:spec_decode_num_accepted_tokens_per_pos_total{{engine="0",'
                  f'model_name="{MODEL_ID}",position="{p}"}} {c("accepted_pos" + str(p), 0.0)}'
                  for p in range(SPEC_K)]
        lines += ["# TYPE process_cpu_seconds_total counter",
                  f"process_cpu_seconds_total {time.process_time()}"]
        return "\n".join(lines) + "\n"


def _directives(text: str) -> dict[str, str]:
    return dict(re.findall(r"\[\[(\w+)=([^\]]*)\]\]", text))


def _logprobs(tokens: list[str], first_index: int, near_tie_at: int | None, chat: bool) -> Any:
    margins = [NEAR_TIE_MARGIN if first_index + k == near_tie_at else 3.0
               for k in range(len(tokens))]
    if chat:
        return {"content": [{"token": t, "logprob": -0.1, "top_logprobs": [
            {"token": t, "logprob": -0.1}, {"token": " alt", "logprob": -0.1 - m}]}
            for t, m in zip(tokens, margins)]}
    return {"tokens": tokens, "token_logprobs": [-0.1] * len(tokens),
            "top_logprobs": [{t: -0.1, " alt": -0.1 - m} for t, m in zip(tokens, margins)]}


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


async def _stream(state: ServerState, body: dict[str, Any], chat: bool,
                  d: dict[str, str]) -> AsyncIterator[bytes]:
    mode = d.get("mode", "ok")
    spec = bool((body.get("speculation") or {}).get("enabled"))
    near_tie_at = int(d["diverge"]) if "diverge" in d else None  # the base model's near tie
    diverge = near_tie_at if spec else None
    n = int(body.get("max_tokens") or 16)
    finish = "length"
    if "eos" in d and not body.get("ignore_eos"):
        n, finish = min(n, int(d["eos"])), "stop"
    want_lp = bool(body.get("logprobs"))
    continuous = bool((body.get("stream_options") or {}).get("continuous_usage_stats"))
    group = SPEC_K if spec else 1
    base = {"id": "cmpl-scripted", "model": MODEL_ID, "created": 0,
            "object": "chat.completion.chunk" if chat else "text_completion"}

    def chunk(text: str, choice_extra: dict[str, Any], usage: int | None) -> bytes:
        choice: dict[str, Any] = {"index": 0, "finish_reason": None, **choice_extra}
        if chat:
            choice["delta"] = {"content": text}
        else:
            choice["text"] = text
        obj = {**base, "choices": [choice]}
        if usage is not None:
            obj["usage"] = {"prompt_tokens": 7, "completion_tokens": usage,
                            "total_tokens": 7 + usage}
        return _sse(obj)

    if chat:
        yield _sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant"},
                                         "finish_reason": None}]})
    if mode == "hang":
        await asyncio.sleep(HANG_S)
        return
    await asyncio.sleep(TTFT_S)
    steps = 0
    for events, start in enumerate(range(0, n, group)):
        if events:
            await asyncio.sleep(GAP_S)
        if mode == "close" and events == 2:
            raise RuntimeError("scripted connection drop")
        if mode == "error_event" and events == 1:
            yield _sse({"error": {"message": "scripted failure", "type": "server_error"}})
            yield b"data: [DONE]\n\n"
            return
        toks = [token_text(i, diverge) for i in range(start, min(n, start + group))]
        extra = {"logprobs": _logprobs(toks, start, near_tie_at, chat)} if want_lp else {}
        if spec:
            state.spec_step(len(toks))
            steps += 1
        yield chunk("".join(toks), extra, start + len(toks) if continuous else None)
    yield chunk("", {"finish_reason": finish}, n if continuous else None)
    if (body.get("stream_options") or {}).get("include_usage"):
        final: dict[str, Any] = {**base, "choices": [], "usage": {
            "prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n}}
        if spec:
            accepted = sum(min(group, n - s) - 1 for s in range(0, n, group))
            final["metrics"] = {"speculative_decoding": {
                "mean_acceptance_length": n / steps, "num_spec_steps": steps,
                "num_draft_tokens": SPEC_K * steps, "num_accepted_draft_tokens": accepted,
                "draft_acceptance_rate": accepted / (SPEC_K * steps),
                "acceptance_histogram": [0, 0, steps, 0], "acceptance_rule": "greedy",
                "acceptance_rate_per_position": [1.0, 1.0, 0.0]}}
        yield _sse(final)
    yield b"data: [DONE]\n\n"


def make_app(state: ServerState) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": MODEL_ID, "object": "model"}]}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        if not state.metrics_enabled:
            return PlainTextResponse("not found", status_code=404)
        return PlainTextResponse(state.metrics_text())

    async def complete(request: Request, chat: bool):
        body = await request.json()
        state.bodies.append(body)
        if chat:
            content = body["messages"][-1]["content"]
            text = content if isinstance(content, str) else json.dumps(content)
        else:
            text = body["prompt"]
        d = _directives(text)
        if d.get("mode") == "429":
            return JSONResponse({"error": {"message": "slow down"}}, status_code=429,
                                headers={"Retry-After": RETRY_AFTER})
        if d.get("mode") == "503":
            return JSONResponse({"error": {"message": "overloaded"}}, status_code=503)
        return StreamingResponse(_stream(state, body, chat, d), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    return app
