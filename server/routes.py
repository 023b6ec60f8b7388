"""HTTP routes: OpenAI completions and chat completions (plain and SSE), models, health,
metrics.

Speculative-decoding statistics per request (extension): a non-streamed response carries
a top-level `"metrics": {"speculative_decoding": {...}}` (fields of `SpecStats.to_dict()`,
summed over the request's choices). A streamed response carries the same key on its final
usage chunk, i.e. only when `stream_options.include_usage` is true.

Streams are `data: {json}\\n\\n` events ending with `data: [DONE]`. One engine step that
accepted several tokens becomes one event. Chat streams open each choice with a role
delta; the last content chunk of a choice carries its `finish_reason`. An error after the
stream has started is sent as a `data: {"error": {...}}` event, then `[DONE]`.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from mtpserve.decoding.config import SamplingParams
from mtpserve.decoding.engine.outputs import RequestOutput

from . import protocol as p
from .state import ServerState
from .engine_api import UnsupportedRequest
from .errors import AUTHENTICATION, APIError, bad_request, validation_error_to_api
from .openapi import openapi_document
from .serving import (ChoiceAcc, Job, chat_logprobs, completion_logprobs, log_request,
                      metrics_of, run_job, token_text, usage_of)

log = logging.getLogger(__name__)

router = APIRouter()

LONG_PROMPT_CHARS = 20_000  # tokenize longer prompts off the event loop
MANY_MESSAGES = 200  # render longer conversations off the event loop
JSON_TYPES = ("application/json",)


def get_state(request: Request) -> ServerState:
    return request.app.state.mtp


# ---------------------------------------------------------------------------------------
# auth, parsing, validation helpers


async def require_api_key(request: Request) -> None:
    key = get_state(request).settings.api_key
    if not key:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode("utf-8", "surrogateescape"), key.encode("utf-8")):
        raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                       AUTHENTICATION, code="invalid_api_key")


def check_content_type(request: Request) -> None:
    """JSON bodies only: a missing Content-Type is taken as JSON, any other type is 415."""
    header = request.headers.get("content-type")
    if header is None:
        return
    media = header.split(";", 1)[0].strip().lower()
    if media in JSON_TYPES or (media.startswith("application/") and media.endswith("+json")):
        return
    raise APIError(415, f"unsupported Content-Type {p.clip(header)!r}: send the body as "
                        f"JSON with 'Content-Type: application/json'",
                   code="unsupported_media_type")


async def parse_body(request: Request, model: type[p.BaseModel]) -> Any:
    check_content_type(request)
    body = await request.body()
    if not body.strip():
        raise bad_request("request body is empty; expected a JSON object", code="invalid_json")
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise validation_error_to_api(exc.errors()) from None


def check_model(state: ServerState, name: str | None) -> None:
    if name is None or name in (state.model_name, getattr(state.engine, "model_name", None)):
        return
    raise APIError(404, f"The model `{p.clip(name)}` does not exist. This server serves "
                        f"`{state.model_name}`.", param="model", code="model_not_found")


def check_length(state: ServerState, num_prompt: int, max_tokens: int) -> None:
    limit = state.max_model_len
    if num_prompt + max_tokens > limit:
        raise bad_request(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{num_prompt + max_tokens} tokens ({num_prompt} in the prompt, {max_tokens} for "
            f"the completion). Please reduce the prompt or max_tokens.",
            param="max_tokens", code="context_length_exceeded")


def check_max_tokens(state: ServerState, max_tokens: int, param: str = "max_tokens") -> None:
    """The server's own cap on max_tokens (--max-tokens-limit), checked before any work."""
    cap = state.settings.max_tokens_limit
    if cap is not None and max_tokens > cap:
        raise bad_request(f"{param} is {max_tokens}, but this server's limit is {cap} tokens "
                          f"per completion (--max-tokens-limit)", param=param,
                          code="max_tokens_exceeded")


def check_num_seqs(state: ServerState, num_prompts: int, n: int) -> None:
    """prompts x n engine sequences per request, at most the admission capacity."""
    limit = state.max_seqs_per_request
    if num_prompts * n > limit:
        raise bad_request(
            f"this request asks for {num_prompts * n} sequences ({num_prompts} prompt(s) x "
            f"n={n}); the limit is {limit} per request (--max-num-seqs + --max-queued)",
            param="prompt" if num_prompts > 1 else "n", code="too_many_sequences")


def default_max_tokens(state: ServerState, num_prompt: int) -> int:
    remaining = state.max_model_len - num_prompt
    if remaining < 1:
        raise bad_request(
            f"This model's maximum context length is {state.max_model_len} tokens. However, "
            f"the prompt has {num_prompt} tokens, leaving no room for the completion.",
            param="messages", code="context_length_exceeded")
    cap = state.settings.max_tokens_limit
    return remaining if cap is None else min(cap, remaining)


def build_params(req: p._SamplingFields, max_tokens: int, logprobs: int | None,
                 seed: int | None) -> SamplingParams:
    spec = req.speculation
    temperature = 1.0 if req.temperature is None else req.temperature
    if temperature < p.GREEDY_BELOW:
        temperature = 0.0  # the limit it approaches; float32 logits / 1e-40 overflow
    top_p = 1.0 if req.top_p is None else req.top_p
    top_k = max(0, req.top_k or 0)
    if top_p < p.TOP1_BELOW:  # keeps only the most likely token: say so exactly
        top_p, top_k = 1.0, 1
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=tuple(req.stop_list),
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            speculate=spec.enabled if spec else None,
            acceptance=spec.acceptance if spec else None,
            typical_epsilon=spec.typical_epsilon if spec else None,
            typical_delta=spec.typical_delta if spec else None,
        )
    except ValueError as exc:
        raise bad_request(str(exc)) from None


def choice_seed(seed: int | None, i: int) -> int | None:
    if seed is None:
        return None
    s = seed + i
    return s if s <= p.SEED_MAX else s - 2**64


def check_speculation(state: ServerState, req: p._SamplingFields) -> None:
    """Per-request speculation options the server cannot honour are refused (400), never
    dropped: asking for speculation where there is none, and whatever the engine backend
    refuses (`EngineBackend.check_request`; e.g. typical acceptance under vLLM)."""
    spec = req.speculation
    if spec is not None and spec.enabled and not getattr(state.engine,
                                                         "speculation_available", True):
        raise bad_request("speculation.enabled is true but speculative decoding is not "
                          "available on this server (no draft heads / --speculate off)",
                          param="speculation.enabled")
    if state.backend is not None:
        try:
            state.backend.check_request(build_params(req, 1, None, None))
        except UnsupportedRequest as exc:
            raise bad_request(str(exc), param=exc.param,
                              code="unsupported_by_backend") from None


async def encode_text(state: ServerState, text: str) -> list[int]:
    tok = state.engine.tokenizer
    if len(text) > LONG_PROMPT_CHARS:
        return await asyncio.to_thread(tok.encode, text)
    return tok.encode(text)


# ---------------------------------------------------------------------------------------
# endpoints


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    state = get_state(request)
    status = state.health_status()
    return JSONResponse({"status": "ok" if status == "ready" else status},
                        status_code=200 if status == "ready" else 503)


@router.get("/openapi.json", include_in_schema=False)
async def openapi(request: Request) -> JSONResponse:
    return JSONResponse(openapi_document(get_state(request)))


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    body, content_type = get_state(request).metrics.render()
    return Response(body, media_type=content_type)


@router.get("/v1/models", dependencies=[Depends(require_api_key)])
async def models(request: Request) -> JSONResponse:
    state = get_state(request)
    state.require_ready()
    card = p.ModelCard(id=state.model_name, max_model_len=state.max_model_len)
    return JSONResponse(p.ModelList(data=[card]).model_dump(mode="json"))


@router.post("/v1/completions", dependencies=[Depends(require_api_key)])
async def completions(request: Request) -> Response:
    arrival = time.monotonic()
    state = get_state(request)
    state.require_ready()
    req: p.CompletionRequest = await parse_body(request, p.CompletionRequest)
    check_model(state, req.model)
    check_speculation(state, req)
    tok = state.engine.tokenizer
    vocab = state.vocab_size
    prompts = req.prompts()
    check_num_seqs(state, len(prompts), req.n)
    max_tokens = req.max_tokens
    if max_tokens is None or "max_tokens" not in req.model_fields_set:
        max_tokens = min(16, state.max_tokens_limit)  # OpenAI's default, within the cap
    check_max_tokens(state, max_tokens)

    prompts_ids: list[list[int]] = []
    prompt_texts: list[str | None] = []
    for item in prompts:
        if isinstance(item, str):
            if not item:
                raise bad_request("prompt must not be empty", param="prompt")
            ids = await encode_text(state, item)
            prompt_texts.append(item)
        else:
            if vocab and any(t >= vocab for t in item):
                raise bad_request(f"prompt token ids must be in [0, {vocab})", param="prompt")
            ids = list(item)
            prompt_texts.append(None)
        if not ids:
            raise bad_request("prompt must not be empty", param="prompt")
        prompts_ids.append(ids)

    for ids in prompts_ids:
        check_length(state, len(ids), max_tokens)
    rid = f"cmpl-{uuid.uuid4().hex}"
    requests: list[tuple[list[int], SamplingParams]] = []
    prefixes: list[str] = []
    for pi, ids in enumerate(prompts_ids):
        prefix = ""
        if req.echo:
            text = prompt_texts[pi]
            prefix = text if text is not None else tok.decode(ids)
        for i in range(req.n):
            requests.append((ids, build_params(req, max(1, max_tokens), req.logprobs,
                                               choice_seed(req.seed, i))))
            prefixes.append(prefix)
    job = Job("/v1/completions", rid, state.model_name, requests,
              sum(len(ids) for ids in prompts_ids), prefixes, req.stream, req.include_usage,
              arrival)
    log_request(state, job, lambda: repr(req.prompt)[:2000])

    if max_tokens == 0:  # echo only: nothing to generate
        choices = [p.CompletionChoice(index=i, text=prefixes[i], finish_reason="length")
                   for i in range(job.n_choices)]
        state.metrics.record_request(job.endpoint, 200, "length")
        state.metrics.prompt_tokens.inc(job.prompt_tokens)
        request.state.metrics_recorded = True
        body = p.CompletionResponse(id=rid, model=job.model, choices=choices,
                                    usage=usage_of(job, []), metrics=metrics_of([]))
        return JSONResponse(body.model_dump(mode="json"))

    tt = token_text(state)
    want_lp = req.logprobs is not None

    def choice_of(a: ChoiceAcc, i: int) -> p.CompletionChoice:
        lp = completion_logprobs(tt, a.logprob_deltas) if want_lp else None
        return p.CompletionChoice(index=i, text=a.text, logprobs=lp,
                                  finish_reason=a.finish_reason)

    def respond(accs: list[ChoiceAcc]) -> BaseModel:
        return p.CompletionResponse(id=rid, model=job.model,
                                    choices=[choice_of(a, i) for i, a in enumerate(accs)],
                                    usage=usage_of(job, accs), metrics=metrics_of(accs))

    def opening(accs: list[ChoiceAcc]) -> list[BaseModel]:
        if not req.echo:
            return []
        return [p.CompletionStreamResponse(id=rid, model=job.model, choices=[
            p.CompletionChoice(index=i, text=a.prefix)]) for i, a in enumerate(accs)]

    def chunks(accs: list[ChoiceAcc], i: int, out: RequestOutput,
               finished: bool) -> list[BaseModel]:
        if not (out.new_text or finished or (want_lp and out.new_token_ids)):
            return []
        a = accs[i]
        lp = None
        if want_lp:
            lp = completion_logprobs(tt, a.logprob_deltas[-1:] if out.logprobs else [])
        return [p.CompletionStreamResponse(id=rid, model=job.model, choices=[
            p.CompletionChoice(index=i, text=out.new_text, logprobs=lp,
                               finish_reason=out.finish_reason if finished else None)])]

    def usage_chunk(accs: list[ChoiceAcc]) -> BaseModel:
        return p.CompletionStreamResponse(id=rid, model=job.model, choices=[],
                                          usage=usage_of(job, accs), metrics=metrics_of(accs))

    return await run_job(request, state, job, respond, chunks, opening, usage_chunk)


@router.post("/v1/chat/completions", dependencies=[Depends(require_api_key)])
async def chat_completions(request: Request) -> Response:
    arrival = time.monotonic()
    state = get_state(request)
    state.require_ready()
    req: p.ChatCompletionRequest = await parse_body(request, p.ChatCompletionRequest)
    check_model(state, req.model)
    check_speculation(state, req)
    check_num_seqs(state, 1, req.n)
    max_tokens = req.requested_max_tokens
    if max_tokens is not None:
        check_max_tokens(state, max_tokens, "max_completion_tokens"
                         if req.max_completion_tokens is not None else "max_tokens")
    tok = state.engine.tokenizer
    messages = [m.to_template_dict() for m in req.messages]
    try:
        if len(messages) > MANY_MESSAGES or \
                sum(len(m["content"]) for m in messages) > LONG_PROMPT_CHARS:
            ids = await asyncio.to_thread(tok.encode_chat, messages)
        else:
            ids = tok.encode_chat(messages)
    except ValueError as exc:
        raise bad_request(f"invalid conversation: {exc}", param="messages") from None
    if not ids:
        raise bad_request("messages produce an empty prompt", param="messages")
    if max_tokens is None:
        max_tokens = default_max_tokens(state, len(ids))
    check_length(state, len(ids), max_tokens)
    top_n = (req.top_logprobs or 0) if req.logprobs else 0
    logprobs = top_n if req.logprobs else None
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    requests = [(ids, build_params(req, max_tokens, logprobs, choice_seed(req.seed, i)))
                for i in range(req.n)]
    job = Job("/v1/chat/completions", rid, state.model_name, requests, len(ids),
              [""] * req.n, req.stream, req.include_usage, arrival)
    log_request(state, job, lambda: repr(messages)[:2000])
    tt = token_text(state)

    def respond(accs: list[ChoiceAcc]) -> BaseModel:
        choices = [p.ChatChoice(index=i, message=p.ChatResponseMessage(content=a.text),
                                logprobs=chat_logprobs(tt, a.logprobs, top_n)
                                if req.logprobs else None,
                                finish_reason=a.finish_reason)
                   for i, a in enumerate(accs)]
        return p.ChatCompletionResponse(id=rid, model=job.model, choices=choices,
                                        usage=usage_of(job, accs), metrics=metrics_of(accs))

    def opening(accs: list[ChoiceAcc]) -> list[BaseModel]:
        return [p.ChatCompletionStreamResponse(id=rid, model=job.model, choices=[
            p.ChatStreamChoice(index=i, delta=p.DeltaMessage(role="assistant", content=""))])
            for i in range(len(accs))]

    def chunks(accs: list[ChoiceAcc], i: int, out: RequestOutput,
               finished: bool) -> list[BaseModel]:
        if not (out.new_text or finished or (req.logprobs and out.new_token_ids)):
            return []
        delta = p.DeltaMessage(content=out.new_text) if out.new_text else p.DeltaMessage()
        lp = chat_logprobs(tt, out.logprobs or [], top_n) if req.logprobs else None
        return [p.ChatCompletionStreamResponse(id=rid, model=job.model, choices=[
            p.ChatStreamChoice(index=i, delta=delta, logprobs=lp,
                               finish_reason=out.finish_reason if finished else None)])]

    def usage_chunk(accs: list[ChoiceAcc]) -> BaseModel:
        return p.ChatCompletionStreamResponse(id=rid, model=job.model, choices=[],
                                              usage=usage_of(job, accs),
                                              metrics=metrics_of(accs))

    return await run_job(request, state, job, respond, chunks, opening, usage_chunk)
