"""What the engine hands back: per-request output deltas and statistics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass(slots=True)
class SpecStats:
    """Speculation statistics of one request, cumulative (vLLM's per-request shape)."""

    acceptance_rule: str = "none"
    num_steps: int = 0  # decode steps that produced tokens for this request
    num_spec_steps: int = 0  # steps that verified at least one drafted token
    num_draft_tokens: int = 0  # tokens drafted on the path candidates (tree nodes)
    num_accepted_draft_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)  # index d: accepted at depth d+1
    drafted_per_position: list[int] = field(default_factory=list)  # paths offering depth d+1
    acceptance_histogram: list[int] = field(default_factory=list)  # index n: steps accepting n drafts

    @property
    def mean_acceptance_length(self) -> float:
        """1 + accepted / spec steps: tokens per verify step, counting the bonus token."""
        if self.num_spec_steps == 0:
            return 1.0
        return 1.0 + self.num_accepted_draft_tokens / self.num_spec_steps

    @property
    def draft_acceptance_rate(self) -> float:
        if self.num_draft_tokens == 0:
            return 0.0
        return self.num_accepted_draft_tokens / self.num_draft_tokens

    def record_step(self, drafted_depths: int, num_nodes: int, accepted: int) -> None:
        """One verify step: a tree of `num_nodes` drafts, `drafted_depths` deep, `accepted` kept."""
        self.num_steps += 1
        if num_nodes == 0:
            return
        self.num_spec_steps += 1
        self.num_draft_tokens += num_nodes
        self.num_accepted_draft_tokens += accepted
        while len(self.accepted_per_position) < drafted_depths:
            self.accepted_per_position.append(0)
            self.drafted_per_position.append(0)
        for d in range(drafted_depths):
            self.drafted_per_position[d] += 1
        for d in range(accepted):
            self.accepted_per_position[d] += 1
        while len(self.acceptance_histogram) <= accepted:
            self.acceptance_histogram.append(0)
        self.acceptance_histogram[accepted] += 1

    def to_dict(self) -> dict:
        """vLLM's `metrics.speculative_decoding` fields plus what vLLM lacks."""
        per_pos = [
            a / d if d else 0.0
            for a, d in zip(self.accepted_per_position, self.drafted_per_position)
        ]
        return {
            "mean_acceptance_length": self.mean_acceptance_length,
            "draft_acceptance_rate": self.draft_acceptance_rate,
            "acceptance_histogram": list(self.acceptance_histogram),
            "num_spec_steps": self.num_spec_steps,
            "num_draft_tokens": self.num_draft_tokens,
            "num_accepted_draft_tokens": self.num_accepted_draft_tokens,
            "acceptance_rule": self.acceptance_rule,
            "accepted_per_position": list(self.accepted_per_position),
            "acceptance_rate_per_position": per_pos,
            "num_steps": self.num_steps,
        }


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


@dataclass(slots=True)
class RequestOutput:
    """A delta: what one engine step added to one request."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    num_prompt_tokens: int
    num_output_tokens: int  # cumulative, excludes anything past a stop point
    finished: bool = False
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or token id that matched
    logprobs: list[TokenLogprob] | None = None  # one per new token when requested
    spec: SpecStats | None = None  # cumulative; set on every output
    error: str | None = None


@dataclass(slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # 0..1, fraction of KV slots in use
    num_steps: int
    generated_tokens: int
