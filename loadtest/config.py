"""Configuration dataclasses for one load-test run (checked at construction).

Only ``cli.py`` reads flags; everything else receives these objects.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

Endpoint = Literal["chat", "completions"]
LoadMode = Literal["closed", "open"]
ABSchedule = Literal["interleaved", "separate", "alternating"]


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` updated by ``extra``; nested dicts merge key by key and a
    ``None`` value removes the key (so ``{"stream_options": null}`` drops a field)."""
    out = dict(base)
    for key, value in extra.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def split_base_url(base_url: str) -> tuple[str, str]:
    """``http://h:p`` or ``http://h:p/v1`` -> (server root, OpenAI API root)."""
    url = base_url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"base URL must start with http:// or https://: {base_url!r}")
    if url.endswith("/v1"):
        return url[: -len("/v1")], url
    return url, url + "/v1"


@dataclass(frozen=True, slots=True)
class Arm:
    """One target: a server (base URL + model) and the body fields added to its requests."""

    name: str
    base_url: str
    model: str | None = None
    api_key: str | None = None
    extra_body: dict[str, Any] = field(default_factory=dict)
    metrics_url: str | None = None  # None: <server root>/metrics

    def __post_init__(self) -> None:
        split_base_url(self.base_url)  # validates
        if not self.name:
            raise ValueError("arm name must be non-empty")

    @property
    def server_root(self) -> str:
        return split_base_url(self.base_url)[0]

    @property
    def api_root(self) -> str:
        return split_base_url(self.base_url)[1]

    @property
    def resolved_metrics_url(self) -> str:
        return self.metrics_url or self.server_root + "/metrics"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@dataclass(frozen=True, slots=True)
class RequestConfig:
    """Fields every request carries (a prompt's own max_tokens overrides ``max_tokens``)."""

    endpoint: Endpoint = "chat"
    max_tokens: int = 256
    temperature: float = 0.0
    seed: int | None = 0
    ignore_eos: bool = False
    timeout_s: float = 120.0
    extra_body: dict[str, Any] = field(default_factory=dict)
    # Asked in every request of the run (both arms alike), so that a temperature-0
    # mismatch is judged from the logprobs of the very run that produced it.
    top_logprobs: int | None = None

    def __post_init__(self) -> None:
        if self.endpoint not in ("chat", "completions"):
            raise ValueError(f"endpoint must be 'chat' or 'completions', got {self.endpoint!r}")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not self.timeout_s > 0:
            raise ValueError("timeout must be > 0")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= 20:
            raise ValueError("top_logprobs must be between 0 and 20")


@dataclass(frozen=True, slots=True)
class LoadLevel:
    """One point of a sweep: closed loop at ``value`` concurrency, or open loop at
    ``value`` requests/s (Poisson; ``inf`` sends everything at once)."""

    mode: LoadMode
    value: float
    num_requests: int
    duration_s: float

    def __post_init__(self) -> None:
        if self.mode not in ("closed", "open"):
            raise ValueError(f"mode must be 'closed' or 'open', got {self.mode!r}")
        if self.mode == "closed" and (self.value < 1 or self.value != int(self.value)):
            raise ValueError(f"concurrency must be a positive integer, got {self.value}")
        if self.mode == "open" and not self.value > 0:
            raise ValueError(f"request rate must be > 0, got {self.value}")
        if self.num_requests < 1:
            raise ValueError("num_requests must be >= 1")
        if not self.duration_s > 0:
            raise ValueError("duration must be > 0")

    @property
    def label(self) -> str:
        if self.mode == "closed":
            return f"c={int(self.value)}"
        rate = "inf" if math.isinf(self.value) else f"{self.value:g}"
        return f"rate={rate}/s"


@dataclass(frozen=True, slots=True)
class BenchmarkConfig:
    """Everything one ``mtpserve-loadtest`` invocation does."""

    arms: tuple[Arm, ...]
    request: RequestConfig
    levels: tuple[LoadLevel, ...]
    workload: str = "humaneval"
    num_prompts: int | None = None
    seed: int = 0
    warmup: int = 0
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    scrape_metrics: bool = True
    bootstrap_resamples: int = 2000
    near_tie_margin: float = 0.5
    max_mismatch_probes: int = 10
    trust_env: bool = False
    # A/B: "interleaved" sends each prompt to both arms in one closed loop (both arms share
    # the load); "separate" runs each level once per arm, alone, order alternating by level
    # (AB, BA, ...): the arms never share a server's batches or the machine's cores;
    # "alternating" is separate within a level too: the level's requests split into
    # ab_blocks chunks, each run by both arms back to back, arm order ABBA..., so a slow
    # spell of the machine falls on both arms instead of on one arm's whole block.
    ab_schedule: ABSchedule = "interleaved"
    ab_blocks: int = 4

    def __post_init__(self) -> None:
        if len(self.arms) not in (1, 2):
            raise ValueError("need one arm, or two for A/B")
        if len({a.name for a in self.arms}) != len(self.arms):
            raise ValueError("arm names must differ")
        if not self.levels:
            raise ValueError("need at least one load level")
        if self.warmup < 0 or (self.num_prompts is not None and self.num_prompts < 1):
            raise ValueError("warmup must be >= 0 and num_prompts >= 1")
        if self.bootstrap_resamples < 100:
            raise ValueError("bootstrap_resamples must be >= 100")
        if self.ab_schedule not in ("interleaved", "separate", "alternating"):
            raise ValueError(f"ab_schedule must be 'interleaved', 'separate' or "
                             f"'alternating', got {self.ab_schedule!r}")
        if self.ab_blocks < 1:
            raise ValueError("ab_blocks must be >= 1")

    @property
    def is_ab(self) -> bool:
        return len(self.arms) == 2
