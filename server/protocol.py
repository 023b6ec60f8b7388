"""Pydantic v2 models of the OpenAI completions / chat completions schema.

Requests are validated strictly (a string where a number belongs is a 400, not a silent
coercion); unknown fields are ignored because official clients send some. Fields that
would change the output but that this server does not implement are refused with a
message naming them, never dropped silently.

Extension fields (not in OpenAI's schema): `top_k`, `ignore_eos` and `speculation`
(see `SpeculationOptions`). Responses carry an extra top-level `metrics` key with the
request's speculative-decoding statistics (see routes.py).
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictStr, model_validator

MAX_N = 8
MAX_STOP = 4
MAX_STOP_CHARS = 1024  # characters per stop string
MAX_COMPLETION_LOGPROBS = 5
MAX_CHAT_TOP_LOGPROBS = 20
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
CHAT_ROLES = ("system", "developer", "user", "assistant")
# temperature below this is decoded greedily (as vLLM does); top_p below this keeps only
# the most likely token, which is what top-p means there (the top token of a vocabulary
# of V <= 1e6 tokens has probability >= 1/V > 1e-6), so it is sent as top_k 1
GREEDY_BELOW = 1e-5
TOP1_BELOW = 1e-6


def clip(text: str, limit: int = 80) -> str:
    """Client text echoed in an error message, cut to `limit` characters."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class _Strict(BaseModel):
    """Strict JSON types, finite floats, extra keys ignored."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class SpeculationOptions(_Strict):
    """Per-request control of self-speculative decoding (extension).

    enabled: None keeps the server default; False decodes one token per step.
    acceptance: "greedy" (only at temperature 0; lossless), "typical" (Medusa's typical
    acceptance, faster, not distribution-exact) or "rejection" (lossless speculative
    sampling); None: greedy at temperature 0, else the server default.
    typical_epsilon / typical_delta: thresholds of typical acceptance, each in (0, 1).
    """

    enabled: bool | None = None
    acceptance: Literal["greedy", "typical", "rejection"] | None = None
    typical_epsilon: Annotated[float, Field(gt=0.0, lt=1.0)] | None = None
    typical_delta: Annotated[float, Field(gt=0.0, lt=1.0)] | None = None


StopString = Annotated[StrictStr, Field(max_length=MAX_STOP_CHARS)]
StopField = Union[StopString, Annotated[list[StopString], Field(max_length=MAX_STOP)], None]


class _SamplingFields(_Strict):
    """Fields shared by both endpoints."""

    model: StrictStr | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stop: StopField = None
    seed: Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    user: StrictStr | None = None
    logit_bias: dict[str, Any] | None = None
    # extensions
    top_k: Annotated[int, Field(ge=-1)] | None = None  # -1 or 0: off (vLLM uses -1)
    ignore_eos: bool = False
    speculation: SpeculationOptions | None = None

    @model_validator(mode="after")
    def _check_common(self) -> "_SamplingFields":
        if self.logit_bias:
            raise ValueError("logit_bias is not supported by this server")
        if "" in self.stop_list:
            raise ValueError("stop strings must be non-empty")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        spec = self.speculation
        if spec is not None:
            if spec.acceptance == "greedy" and (self.temperature is None or self.temperature > 0):
                raise ValueError(
                    "speculation.acceptance 'greedy' requires temperature 0; use 'typical' or "
                    "'rejection' for sampling")
            if (spec.typical_epsilon is not None or spec.typical_delta is not None) \
                    and spec.acceptance in ("greedy", "rejection"):
                raise ValueError(
                    "speculation.typical_epsilon/typical_delta apply only to "
                    "acceptance 'typical'")
        return self

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


# ---------------------------------------------------------------------------------------
# /v1/completions

PromptField = Union[
    StrictStr,
    Annotated[list[StrictStr], Field(min_length=1)],
    Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)],
    Annotated[list[Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]],
              Field(min_length=1)],
]


class CompletionRequest(_SamplingFields):
    prompt: PromptField
    max_tokens: Annotated[int, Field(ge=0)] | None = 16
    logprobs: Annotated[int, Field(ge=0, le=MAX_COMPLETION_LOGPROBS)] | None = None
    echo: bool = False
    best_of: Annotated[int, Field(ge=1)] | None = None
    suffix: StrictStr | None = None

    @model_validator(mode="after")
    def _check_completion(self) -> "CompletionRequest":
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of different from n is not supported by this server")
        if self.suffix:
            raise ValueError("suffix is not supported by this server")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens must be at least 1 (0 is only allowed with echo)")
        if self.echo and self.logprobs is not None:
            raise ValueError("echo together with logprobs is not supported "
                             "(prompt logprobs are not computed)")
        if self.echo and self.stream and self.max_tokens == 0:
            raise ValueError("max_tokens 0 is not supported with stream")
        return self

    def prompts(self) -> list[str] | list[list[int]]:
        """The prompt as a list: strings or token-id lists, one per prompt."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if isinstance(p[0], str):
            return list(p)  # type: ignore[arg-type]
        if isinstance(p[0], int):
            return [list(p)]  # type: ignore[arg-type]
        return [list(x) for x in p]  # type: ignore[union-attr]


# ---------------------------------------------------------------------------------------
# /v1/chat/completions


class TextContentPart(_Strict):
    type: Annotated[StrictStr, Field(json_schema_extra={"enum": ["text"]})]
    text: StrictStr | None = None

    @model_validator(mode="after")
    def _only_text(self) -> "TextContentPart":
        if self.type != "text":
            raise ValueError(f"content part type {clip(self.type)!r} is not supported "
                             "(only 'text')")
        if self.text is None:
            raise ValueError("a text content part needs 'text'")
        return self


class ChatMessage(_Strict):
    role: Annotated[StrictStr, Field(json_schema_extra={"enum": list(CHAT_ROLES)})]
    content: StrictStr | list[TextContentPart] | None = None
    name: StrictStr | None = None

    @model_validator(mode="after")
    def _check_role(self) -> "ChatMessage":
        if self.role not in CHAT_ROLES:
            raise ValueError(
                f"message role {clip(self.role)!r} is not supported "
                "(use system, developer, user or assistant)")
        if self.content is None:
            raise ValueError(f"a {self.role} message needs content")
        return self

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text or "" for p in self.content or [])

    def to_template_dict(self) -> dict[str, str]:
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": self.text()}


class ResponseFormat(_Strict):
    type: Annotated[StrictStr, Field(json_schema_extra={"enum": ["text"]})] = "text"


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_CHAT_TOP_LOGPROBS)] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _check_chat(self) -> "ChatCompletionRequest":
        if self.tools or self.functions:
            raise ValueError("tools / function calling is not supported by this server")
        if self.tool_choice not in (None, "none") or self.function_call not in (None, "none"):
            raise ValueError("tool_choice / function_call is not supported by this server")
        if self.response_format is not None and self.response_format.type != "text":
            raise ValueError(
                f"response_format {clip(self.response_format.type)!r} is not supported "
                "(only 'text')")
        if self.top_logprobs is not None and self.top_logprobs > 0 and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens


# ---------------------------------------------------------------------------------------
# responses


def now() -> int:
    return int(time.time())


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo
    metrics: dict[str, Any] | None = None


class CompletionStreamResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    metrics: dict[str, Any] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None
    refusal: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    metrics: dict[str, Any] | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionStreamResponse(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None
    metrics: dict[str, Any] | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "mtpserve"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def dump_chunk(chunk: BaseModel) -> str:
    """One SSE event. `metrics` appears only where set; delta keys only where set."""
    data = chunk.model_dump(mode="json")
    if data.get("metrics") is None:
        data.pop("metrics", None)
    for choice in data.get("choices", []):
        delta = choice.get("delta")
        if delta is not None:
            for key in [k for k, v in delta.items() if v is None]:
                delta.pop(key)
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"
