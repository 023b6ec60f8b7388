"""Per-request translation between mtpserve and vLLM: refusing features only the native
engine has (HTTP 400 naming the field, before anything reaches vLLM), our
`SamplingParams` -> vLLM's, and vLLM's streamed outputs (deltas) -> our `RequestOutput`
with the per-request speculation stats vLLM reports at the end.

Refused per request: `speculation.acceptance: "typical"`, `speculation.typical_*` and
`speculation.enabled: false` (vLLM cannot turn speculation off per request).

Separate from the backend's lifecycle (vllm_backend.py): plain functions over the request
and output objects; vLLM is imported only inside `to_vllm_sampling_params`.
"""

from __future__ import annotations

from typing import Any

from mtpserve.decoding.config import SamplingParams
from mtpserve.decoding.engine.outputs import RequestOutput, SpecStats, TokenLogprob

from .engine_api import UnsupportedRequest


def check_vllm_request(params: SamplingParams, speculation: bool) -> None:
    """Refuse (UnsupportedRequest -> 400) per-request features only the native engine has.
    Runs before anything reaches vLLM."""
    if params.acceptance == "typical":
        raise UnsupportedRequest(
            "speculation.acceptance 'typical' is not available with the vLLM backend (vLLM "
            "verifies drafts by rejection sampling: use 'rejection', or leave it out)",
            "speculation.acceptance")
    for name in ("typical_epsilon", "typical_delta"):
        if getattr(params, name) is not None:
            raise UnsupportedRequest(
                f"speculation.{name} is not available with the vLLM backend (no typical "
                f"acceptance)", f"speculation.{name}")
    if params.speculate is False and speculation:
        raise UnsupportedRequest(
            "speculation.enabled false is not available with the vLLM backend: vLLM cannot "
            "turn speculative decoding off for one request (greedy output is the same "
            "either way)", "speculation.enabled")


def _spec_stats(m: Any, greedy: bool, num_steps: int) -> SpecStats:
    """vLLM's per-request RequestSpecDecodeMetrics ("detailed") as SpecStats."""
    s = SpecStats(acceptance_rule="greedy" if greedy else "rejection")
    drafted = list(getattr(m, "per_step_drafted", None) or [])
    accepted = list(getattr(m, "per_step_accepted", None) or [])
    for d, a in zip(drafted, accepted):
        s.record_step(int(d), int(d), int(a))
    s.num_steps = max(num_steps, s.num_steps)
    return s


def _finish_reason(reason: str | None) -> str:
    return reason if reason in ("stop", "length", "abort", "error") else "stop"


class RequestState:
    """What converting one request's outputs needs across deltas."""

    __slots__ = ("num_prompt", "num_output", "num_steps", "params")

    def __init__(self, num_prompt: int, params: SamplingParams) -> None:
        self.num_prompt, self.params = num_prompt, params
        self.num_output = 0
        self.num_steps = 0


def to_vllm_sampling_params(p: SamplingParams) -> Any:
    """Our SamplingParams as vLLM's (one sequence, outputs as deltas)."""
    from vllm import SamplingParams as VSP
    from vllm.sampling_params import RequestOutputKind

    return VSP(
        n=1, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k or 0,
        seed=p.seed, stop=list(p.stop) or None,
        stop_token_ids=list(p.stop_token_ids) or None, ignore_eos=p.ignore_eos,
        max_tokens=p.max_tokens, logprobs=p.logprobs,
        presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
        output_kind=RequestOutputKind.DELTA)


def to_request_output(rid: str, out: Any, st: RequestState,
                      speculation_available: bool) -> RequestOutput:
    """One vLLM RequestOutput (a delta) as ours, advancing the request's counts in `st`."""
    c = out.outputs[0]
    new_ids = [int(t) for t in c.token_ids]
    st.num_output += len(new_ids)
    if new_ids:
        st.num_steps += 1
    lps = None
    k = st.params.logprobs
    if k is not None and c.logprobs is not None:
        lps = []
        for tid, pos in zip(new_ids, list(c.logprobs)[-len(new_ids):] if new_ids else []):
            entry = pos.get(tid)
            top = sorted(((int(t), float(lp.logprob)) for t, lp in pos.items()
                          if lp.rank is not None and lp.rank <= k), key=lambda x: -x[1])
            lps.append(TokenLogprob(tid, float(entry.logprob) if entry else float("nan"),
                                    top[:k]))
    finished = bool(out.finished)
    spec = None  # vLLM reports per-request speculation when the request finishes
    if finished:
        if speculation_available:
            spec = _spec_stats(getattr(c, "spec_decode_metrics", None),
                               st.params.greedy, st.num_steps)
        else:
            spec = SpecStats(num_steps=st.num_steps)
    return RequestOutput(
        rid, new_ids, c.text or "", st.num_prompt, st.num_output, finished=finished,
        finish_reason=_finish_reason(c.finish_reason) if finished else None,
        stop_reason=c.stop_reason if finished else None, logprobs=lps, spec=spec)
