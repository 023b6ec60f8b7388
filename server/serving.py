"""Generation plumbing shared by the endpoints: submit a validated job, follow its engine
outputs, build plain responses or SSE streams, logprobs in OpenAI's shapes, metrics.

Cancellation: a plain request polls `request.is_disconnected()` while it waits; a stream
is cancelled by Starlette when the client goes away. Either way the engine requests are
aborted and the admission slots released (`RequestStream.close`, idempotent).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Sequence

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from mtpserve.decoding.config import SamplingParams
from mtpserve.decoding.engine.outputs import RequestOutput, SpecStats, TokenLogprob

from . import protocol as p
from .engine_client import EngineUnavailable, QueueFull, RequestStream
from .errors import (RATE_LIMIT, SERVER_ERROR, UNAVAILABLE, APIError, api_error_response,
                     bad_request, error_event)
from .metrics import RequestTracker

if TYPE_CHECKING:
    from .state import ServerState

log = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.25
STATUS_CLIENT_GONE = 499  # metrics label for requests whose client disconnected


class _TokenText:
    """Token id -> display string and UTF-8 bytes, cached per tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self.text = lru_cache(maxsize=65536)(self._text)
        self.bytes = lru_cache(maxsize=65536)(self._bytes)

    def _text(self, token_id: int) -> str:
        try:
            return self.tok.decode([token_id], skip_special_tokens=False)
        except TypeError:  # a tokenizer without the keyword
            return self.tok.decode([token_id])

    def _bytes(self, token_id: int) -> list[int]:
        fn = getattr(self.tok, "token_bytes", None)
        if fn is not None:
            try:
                return list(fn(token_id))
            except Exception:
                pass
        return list(self._text(token_id).encode("utf-8"))


def token_text(state: ServerState) -> _TokenText:
    cache = getattr(state, "_token_text", None)
    if cache is None or cache.tok is not state.engine.tokenizer:
        cache = _TokenText(state.engine.tokenizer)
        state._token_text = cache  # type: ignore[attr-defined]
    return cache


def merge_spec(stats: Sequence[SpecStats | None]) -> SpecStats:
    """Sum the cumulative statistics of several choices."""
    total = SpecStats()
    rules = {s.acceptance_rule for s in stats if s is not None}
    total.acceptance_rule = rules.pop() if len(rules) == 1 else ("mixed" if rules else "none")

    def add(dst: list[int], src: list[int]) -> None:
        while len(dst) < len(src):
            dst.append(0)
        for i, v in enumerate(src):
            dst[i] += v

    for s in stats:
        if s is None:
            continue
        total.num_steps += s.num_steps
        total.num_spec_steps += s.num_spec_steps
        total.num_draft_tokens += s.num_draft_tokens
        total.num_accepted_draft_tokens += s.num_accepted_draft_tokens
        add(total.accepted_per_position, s.accepted_per_position)
        add(total.drafted_per_position, s.drafted_per_position)
        add(total.acceptance_histogram, s.acceptance_histogram)
    return total


# ---------------------------------------------------------------------------------------
# generation plumbing shared by both endpoints


@dataclass(slots=True)
class ChoiceAcc:
    """What one choice has produced so far."""

    prefix: str = ""  # echoed prompt
    parts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    # (text offset where the delta starts, its logprobs): streamed and plain responses
    # compute completions' text_offset from the same boundaries
    logprob_deltas: list[tuple[int, list[TokenLogprob]]] = field(default_factory=list)
    text_len: int = 0
    num_output_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    spec: SpecStats | None = None

    def add(self, out: RequestOutput) -> None:
        if out.logprobs:
            self.logprobs.extend(out.logprobs)
            self.logprob_deltas.append((len(self.prefix) + self.text_len, out.logprobs))
        if out.new_text:
            self.parts.append(out.new_text)
            self.text_len += len(out.new_text)
        self.num_output_tokens = out.num_output_tokens
        if out.spec is not None:
            self.spec = out.spec
        if out.finished:
            self.finish_reason = out.finish_reason
            self.error = out.error

    @property
    def text(self) -> str:
        return self.prefix + "".join(self.parts)



@dataclass
class Job:
    """A validated generation request: one engine request per choice."""

    endpoint: str
    response_id: str
    model: str
    requests: list[tuple[list[int], SamplingParams]]
    prompt_tokens: int
    prefixes: list[str]  # echo text per choice ("" when not echoing)
    stream: bool
    include_usage: bool
    arrival: float

    @property
    def n_choices(self) -> int:
        return len(self.requests)


def usage_of(job: Job, accs: Sequence[ChoiceAcc]) -> p.UsageInfo:
    completion = sum(a.num_output_tokens for a in accs)
    return p.UsageInfo(prompt_tokens=job.prompt_tokens, completion_tokens=completion,
                       total_tokens=job.prompt_tokens + completion)


def metrics_of(accs: Sequence[ChoiceAcc]) -> dict[str, Any]:
    return {"speculative_decoding": merge_spec([a.spec for a in accs]).to_dict()}


def submit_job(state: ServerState, job: Job) -> RequestStream:
    client = state.require_ready()
    try:
        return client.submit(job.requests, request_id=job.response_id)
    except QueueFull:
        raise APIError(
            429, f"server is at capacity: {client.inflight} sequences in flight and this "
                 f"request needs {job.n_choices}; the limit is {client.capacity} "
                 f"(--max-num-seqs {state.max_num_seqs} + --max-queued "
                 f"{state.settings.max_queued}); retry later",
            RATE_LIMIT, code="rate_limit_exceeded", headers={"Retry-After": "1"}) from None
    except EngineUnavailable as exc:
        raise APIError(503, str(exc), UNAVAILABLE, code="engine_unavailable") from None
    except ValueError as exc:
        raise bad_request(str(exc)) from None


class ClientGone(Exception):
    pass


async def collect(request: Request, stream: RequestStream, tracker: RequestTracker,
                  accs: list[ChoiceAcc]) -> None:
    """Drain a stream for a non-streamed response, aborting if the client goes away."""

    async def consume() -> None:
        async for index, out, t in stream:
            tracker.observe(index, out, t)
            accs[index].add(out)
            if out.finished and out.finish_reason in ("error", "abort"):
                return  # the request has failed: the other choices are aborted below

    task = asyncio.ensure_future(consume())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                task.result()
                return
            if await request.is_disconnected():
                raise ClientGone()
    finally:
        if not task.done():
            task.cancel()
        stream.close()


def failure_of(accs: Sequence[ChoiceAcc]) -> APIError | None:
    for a in accs:
        if a.finish_reason == "error":
            return APIError(500, f"generation failed: {a.error or 'engine error'}",
                            SERVER_ERROR, code="engine_error")
    for a in accs:
        if a.finish_reason == "abort":
            return APIError(503, "the request was aborted (server shutting down)",
                            UNAVAILABLE, code="aborted")
    return None


async def run_job(request: Request, state: ServerState, job: Job,
                  respond: Callable[[list[ChoiceAcc]], BaseModel],
                  chunks: Callable[[list[ChoiceAcc], int, RequestOutput, bool], list[BaseModel]],
                  opening: Callable[[list[ChoiceAcc]], list[BaseModel]],
                  usage_chunk: Callable[[list[ChoiceAcc]], BaseModel]) -> Response:
    accs = [ChoiceAcc(prefix=job.prefixes[i]) for i in range(job.n_choices)]
    stream = submit_job(state, job)
    request.state.metrics_recorded = True  # the tracker records this request from here
    tracker = state.metrics.tracker(job.endpoint, job.arrival)

    def finish(status: int, finish_reason: str | None = None) -> None:
        tracker.finish(status, job.prompt_tokens, sum(a.num_output_tokens for a in accs),
                       finish_reason, time.monotonic())

    if not job.stream:
        try:
            await collect(request, stream, tracker, accs)
        except ClientGone:
            finish(STATUS_CLIENT_GONE, "abort")
            log.info("%s: client disconnected, aborted", job.response_id)
            return Response(status_code=STATUS_CLIENT_GONE)
        except asyncio.CancelledError:  # server shutdown past the drain timeout
            finish(STATUS_CLIENT_GONE, "abort")
            raise
        except Exception:
            finish(500, "error")
            raise
        failure = failure_of(accs)
        if failure is not None:
            finish(failure.status_code)
            return api_error_response(failure)
        finish(200)
        return JSONResponse(respond(accs).model_dump(mode="json", exclude_none=False))

    async def events() -> AsyncIterator[str]:
        status = STATUS_CLIENT_GONE
        reason: str | None = "abort"
        try:
            for chunk in opening(accs):
                yield p.dump_chunk(chunk)
            failed: APIError | None = None
            async for index, out, t in stream:
                tracker.observe(index, out, t)
                accs[index].add(out)
                if out.finished and out.finish_reason in ("error", "abort"):
                    failed = failure_of([accs[index]])
                    break
                for chunk in chunks(accs, index, out, out.finished):
                    yield p.dump_chunk(chunk)
            if failed is not None:
                stream.close()
                status, reason = failed.status_code, None
                yield error_event(failed)
            else:
                status, reason = 200, None
                if job.include_usage:
                    yield p.dump_chunk(usage_chunk(accs))
            yield "data: [DONE]\n\n"
        except Exception as exc:  # a bug after the headers went out: tell the client
            log.exception("%s: stream failed", job.response_id)
            status, reason = 500, "error"
            yield error_event(f"internal server error: {type(exc).__name__}")
            yield "data: [DONE]\n\n"
        finally:
            stream.close()
            finish(status, reason)

    def cleanup() -> None:  # runs whether or not events() ever started
        stream.close()
        finish(STATUS_CLIENT_GONE, "abort")  # no-op when events() already recorded it

    return _EngineStreamingResponse(events(), cleanup)


class _EngineStreamingResponse(StreamingResponse):
    """SSE response that releases its engine requests however the response ends.

    A client that disconnects before the body iterator starts would otherwise leave the
    generator unstarted, its `finally` unrun, and the engine requests and admission slots
    held until they finish on their own.
    """

    def __init__(self, content: AsyncIterator[str], cleanup: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._cleanup = cleanup

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._cleanup()


def log_request(state: ServerState, job: Job, prompt_repr: Callable[[], str]) -> None:
    sp = job.requests[0][1]
    if state.settings.log_prompts:
        log.info("%s: %d prompt tokens, %d choice(s), max_tokens %d, temperature %g, "
                 "prompt %s", job.response_id, job.prompt_tokens, job.n_choices,
                 sp.max_tokens, sp.temperature, prompt_repr())
    else:
        log.info("%s: %d prompt tokens, %d choice(s), max_tokens %d, temperature %g",
                 job.response_id, job.prompt_tokens, job.n_choices, sp.max_tokens,
                 sp.temperature)


# ---------------------------------------------------------------------------------------
# logprobs in OpenAI's shapes


def completion_logprobs(tt: _TokenText, deltas: Sequence[tuple[int, Sequence[TokenLogprob]]]
                        ) -> p.CompletionLogprobs:
    """OpenAI's completions shape; `deltas` are (text offset of the delta, its tokens)."""
    out = p.CompletionLogprobs()
    for offset, lps in deltas:
        for lp in lps:
            s = tt.text(lp.token_id)
            out.tokens.append(s)
            out.token_logprobs.append(lp.logprob)
            top = {tt.text(tid): v for tid, v in lp.top}
            top.setdefault(s, lp.logprob)  # OpenAI lists the chosen token too
            out.top_logprobs.append(top)
            out.text_offset.append(offset)
            offset += len(s)
    return out


def chat_logprobs(tt: _TokenText, lps: Sequence[TokenLogprob], top_n: int) -> p.ChatLogprobs:
    content = []
    for lp in lps:
        content.append(p.ChatTokenLogprob(
            token=tt.text(lp.token_id), logprob=lp.logprob, bytes=tt.bytes(lp.token_id),
            top_logprobs=[p.TopLogprob(token=tt.text(tid), logprob=v, bytes=tt.bytes(tid))
                          for tid, v in lp.top[:top_n]]))
    return p.ChatLogprobs(content=content)
