"""Token attribution and per-request latencies from timed stream events. Pure.

How tokens are attributed to SSE events
---------------------------------------
A speculative server can emit several tokens in one SSE event (one verification step
accepts k drafted tokens plus a bonus token). For each event we need its token count:

1. **Per-chunk usage.** If the server reports ``usage.completion_tokens`` on chunks that
   carry output (vLLM's ``continuous_usage_stats``), an event's count is the increase of
   that running total since the previous chunk.
2. **Logprobs.** Otherwise, if the chunk carries logprobs, the count is the number of
   token entries in them.
3. **Character share.** Otherwise the tokens not attributed by 1-2 (the final usage
   chunk's ``completion_tokens`` minus what 1-2 attributed) are shared over the
   remaining text-bearing events: each gets one token, and the rest are split in
   proportion to the event's number of characters (largest-remainder rounding, so the
   counts are integers and sum exactly to the total; ties go to the earlier event).
4. Without any usage at all, each text-bearing event counts as one token.

Inter-token latencies (ITL): an event carrying n tokens that arrives a gap g after the
previous token-bearing event contributes n latencies of g/n each (the gap spread evenly
over its tokens). The first token-bearing event defines TTFT; its further tokens arrived
together with the first and get ITL 0. So a request with N attributed tokens has N-1
ITLs, they sum to (last token time - TTFT), and its TPOT = (last token time - TTFT)/(N-1)
equals its mean ITL.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence


@dataclass(slots=True)
class TimedEvent:
    """One SSE event: arrival time (s since the request was sent) and what it carried."""

    t: float
    text: str = ""
    usage_tokens: int | None = None   # cumulative usage.completion_tokens on this chunk
    logprob_tokens: int | None = None


@dataclass(slots=True)
class Latencies:
    ttft_s: float | None = None
    last_token_s: float | None = None
    tpot_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    attributed_tokens: int = 0


def _largest_remainder(total: int, weights: Sequence[int]) -> list[int]:
    """Integers proportional to ``weights`` summing to ``total`` (exact integer math)."""
    wsum = sum(weights)
    if total <= 0 or not weights:
        return [0] * len(weights)
    if wsum == 0:
        weights, wsum = [1] * len(weights), len(weights)
    base = [total * w // wsum for w in weights]
    rems = [total * w % wsum for w in weights]
    order = sorted(range(len(weights)), key=lambda i: (-rems[i], i))
    for i in order[: total - sum(base)]:
        base[i] += 1
    return base


def attribute_tokens(events: Sequence[TimedEvent],
                     total_tokens: int | None) -> tuple[list[int], str]:
    """Token count of every event and a label of the sources used (``+``-joined)."""
    counts: list[int | None] = [None] * len(events)
    sources: set[str] = set()
    continuous = any(e.usage_tokens is not None and e.text for e in events)
    if continuous:
        prev = 0
        for i, e in enumerate(events):
            if e.usage_tokens is not None:
                counts[i] = max(0, e.usage_tokens - prev)
                prev = max(prev, e.usage_tokens)
                if counts[i]:
                    sources.add("usage_stream")
    for i, e in enumerate(events):
        if counts[i] is None and e.logprob_tokens is not None:
            counts[i] = e.logprob_tokens
            if e.logprob_tokens:
                sources.add("logprobs")
    rest = [i for i, e in enumerate(events) if counts[i] is None and e.text]
    if rest:
        if total_tokens is None:
            for i in rest:
                counts[i] = 1
            sources.add("events")
        else:
            remaining = total_tokens - sum(c for c in counts if c)
            if remaining >= len(rest):
                extra = _largest_remainder(remaining - len(rest),
                                           [len(events[i].text) for i in rest])
                shares = [1 + x for x in extra]
            else:
                shares = _largest_remainder(remaining, [len(events[i].text) for i in rest])
            for i, n in zip(rest, shares):
                counts[i] = n
            sources.add("char_share")
    return [c or 0 for c in counts], "+".join(sorted(sources))


def compute_latencies(events: Sequence[TimedEvent], counts: Sequence[int]) -> Latencies:
    """TTFT, ITLs and TPOT from events and their token counts (see module docstring)."""
    out = Latencies()
    prev: float | None = None
    for e, n in zip(events, counts):
        if n <= 0:
            continue
        if prev is None:
            out.ttft_s = e.t
            out.itl_s.extend([0.0] * (n - 1))
        else:
            gap = (e.t - prev) / n
            out.itl_s.extend([gap] * n)
        prev = e.t
        out.attributed_tokens += n
    out.last_token_s = prev
    if out.ttft_s is not None and prev is not None and out.attributed_tokens > 1:
        out.tpot_s = (prev - out.ttft_s) / (out.attributed_tokens - 1)
    return out
