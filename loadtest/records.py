"""Per-request result record and the error-type vocabulary."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Error types a record can carry (``error_type``); ``None`` means success.
ERROR_TYPES = (
    "timeout",            # per-request --timeout elapsed (or an httpx timeout fired)
    "http_429",           # rate limited (retry_after_s holds Retry-After when sent)
    "http_4xx",           # other 4xx status
    "http_5xx",           # 5xx status
    "connect_error",      # could not connect / connection refused
    "connection_closed",  # peer closed the connection mid-stream
    "stream_error",       # an SSE event carried {"error": ...}
    "incomplete_stream",  # stream ended cleanly without [DONE] or finish_reason
    "bad_response",       # undecodable SSE payload
    "cancelled",          # still in flight when the level's --duration ran out (not an error)
    "other",
)


@dataclass(slots=True)
class TokenLogprob:
    """One output token with its logprob and the top alternatives (best first)."""

    token: str
    logprob: float | None
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass(slots=True)
class RequestRecord:
    """What one streaming request measured. Times are seconds; ``start_s`` is relative
    to the start of its load level, ``ttft_s``/``e2e_s``/``event_offsets_s`` to the
    moment the request was sent."""

    request_id: int
    level: str
    arm: str
    prompt_id: str
    prompt_index: int
    start_s: float = 0.0
    ok: bool = False
    error_type: str | None = None
    error_detail: str | None = None
    status_code: int | None = None
    retry_after_s: float | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    tpot_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int | None = None
    token_count_source: str = ""
    num_events: int = 0
    event_offsets_s: list[float] = field(default_factory=list)
    event_tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    text: str = ""
    spec: dict[str, Any] | None = None
    token_logprobs: list[TokenLogprob] | None = None

    @property
    def output_tokens_per_s(self) -> float | None:
        if not self.ok or not self.e2e_s:
            return None
        return self.output_tokens / self.e2e_s
