"""Prometheus ``/metrics``: scrape, parse, counter deltas, speculative-decoding stats.

Samples are keyed by ``(sample name, sorted label pairs)``. Parsing uses
``prometheus_client.parser`` when installed and falls back to a small parser of the
text exposition format otherwise (or when prometheus_client rejects the text).

Recognised counter families (each with or without the ``_total`` suffix):

mtpserve: ``mtpserve_spec_decode_num_drafts``, ``..._num_draft_tokens``,
``..._num_accepted_tokens``, ``..._num_accepted_tokens_per_pos{position}``,
``..._num_drafts_per_pos{position}``;
vLLM: ``vllm:spec_decode_num_drafts``, ``..._num_draft_tokens``,
``..._num_accepted_tokens``, ``..._num_accepted_tokens_per_pos{position}``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping

import httpx

SampleKey = tuple[str, tuple[tuple[str, str], ...]]
Samples = dict[SampleKey, float]

FAMILIES = {"mtpserve": "mtpserve_spec_decode_", "vllm": "vllm:spec_decode_"}

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+\S+)?\s*$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def _parse_labels(text: str) -> tuple[tuple[str, str], ...]:
    labels = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _LABEL.match(text, pos)
        if not m:
            raise ValueError(f"bad label set: {text!r}")
        value = re.sub(r'\\[\\"n]', lambda x: _UNESCAPE[x.group(0)], m.group(2))
        labels.append((m.group(1), value))
        pos = m.end()
    return tuple(sorted(labels))


def parse_text_fallback(text: str) -> Samples:
    """Small parser of the Prometheus text format (comments and bad lines skipped)."""
    out: Samples = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            continue
        try:
            value = float(m.group(4))
            labels = _parse_labels(m.group(3) or "")
        except ValueError:
            continue
        out[(m.group(1), labels)] = value
    return out


def parse_text(text: str) -> Samples:
    """Parse exposition text into samples."""
    try:
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError:
        return parse_text_fallback(text)
    try:
        out: Samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
        return out
    except (ValueError, TypeError, IndexError):
        return parse_text_fallback(text)


def counter_deltas(before: Samples, after: Samples) -> Samples:
    """after - before per sample; a sample that went down was reset, so its delta is
    its value after; one absent before counts from 0."""
    out: Samples = {}
    for key, value in after.items():
        prev = before.get(key, 0.0)
        out[key] = value if value < prev else value - prev
    return out


def _select(samples: Samples, base: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Samples of counter ``base``: the ``_total`` variant if present, else the bare name."""
    for name in (base + "_total", base):
        found = {labels: v for (n, labels), v in samples.items() if n == name}
        if found:
            return found
    return {}


def _sum(samples: Samples, base: str) -> float | None:
    found = _select(samples, base)
    return sum(found.values()) if found else None


def _by_position(samples: Samples, base: str) -> dict[int, float]:
    out: dict[int, float] = {}
    for labels, v in _select(samples, base).items():
        pos = dict(labels).get("position")
        if pos is not None and pos.lstrip("-").isdigit():
            out[int(pos)] = out.get(int(pos), 0.0) + v
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


@dataclass(frozen=True, slots=True)
class SpecDecodeStats:
    """Speculative-decoding counters over one interval and what follows from them."""

    source: str                      # "mtpserve" or "vllm"
    num_drafts: float                # verification steps that had drafts
    num_draft_tokens: float
    num_accepted_tokens: float
    accepted_per_position: dict[int, float] = field(default_factory=dict)
    drafts_per_position: dict[int, float] = field(default_factory=dict)

    @property
    def acceptance_rate(self) -> float | None:
        return _ratio(self.num_accepted_tokens, self.num_draft_tokens)

    @property
    def mean_accepted_per_step(self) -> float | None:
        """Accepted draft tokens per step (bonus token not counted)."""
        return _ratio(self.num_accepted_tokens, self.num_drafts)

    @property
    def mean_acceptance_length(self) -> float | None:
        """Tokens emitted per step, bonus token counted (vLLM's definition)."""
        m = self.mean_accepted_per_step
        return None if m is None else 1.0 + m

    @property
    def acceptance_per_position(self) -> list[float | None]:
        """Acceptance rate of draft position i: accepted at i / drafts reaching i
        (per-position draft counts when exported, else all drafts, as vLLM does)."""
        if not self.accepted_per_position:
            return []
        n = max(self.accepted_per_position) + 1
        return [_ratio(self.accepted_per_position.get(i, 0.0),
                       self.drafts_per_position.get(i, self.num_drafts)
                       if self.drafts_per_position else self.num_drafts)
                for i in range(n)]

    def to_dict(self) -> dict[str, object]:
        return {"source": self.source, "num_drafts": self.num_drafts,
                "num_draft_tokens": self.num_draft_tokens,
                "num_accepted_tokens": self.num_accepted_tokens,
                "acceptance_rate": self.acceptance_rate,
                "mean_accepted_per_step": self.mean_accepted_per_step,
                "mean_acceptance_length": self.mean_acceptance_length,
                "acceptance_per_position": self.acceptance_per_position,
                "accepted_per_position": {str(k): v for k, v in
                                          sorted(self.accepted_per_position.items())},
                "drafts_per_position": {str(k): v for k, v in
                                        sorted(self.drafts_per_position.items())}}


def spec_decode_stats(deltas: Samples) -> dict[str, SpecDecodeStats]:
    """Stats for every recognised family present in ``deltas`` (keyed by source)."""
    out = {}
    for source, prefix in FAMILIES.items():
        drafts = _sum(deltas, prefix + "num_drafts")
        draft_tokens = _sum(deltas, prefix + "num_draft_tokens")
        accepted = _sum(deltas, prefix + "num_accepted_tokens")
        if drafts is None and draft_tokens is None and accepted is None:
            continue
        out[source] = SpecDecodeStats(
            source=source, num_drafts=drafts or 0.0, num_draft_tokens=draft_tokens or 0.0,
            num_accepted_tokens=accepted or 0.0,
            accepted_per_position=_by_position(deltas, prefix + "num_accepted_tokens_per_pos"),
            drafts_per_position=_by_position(deltas, prefix + "num_drafts_per_pos"))
    return out


async def scrape(http: httpx.AsyncClient, url: str, *, timeout_s: float = 10.0,
                 headers: Mapping[str, str] | None = None) -> Samples | None:
    """GET and parse ``url``; None when the endpoint is missing or unreachable."""
    try:
        resp = await http.get(url, timeout=timeout_s, headers=dict(headers or {}))
    except httpx.HTTPError:
        return None
    if resp.status_code != 200:
        return None
    return parse_text(resp.text)
