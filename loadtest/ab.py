"""A/B comparison of two arms at one load level.

Both arms got the same prompts, interleaved (see ``runner.build_items``). Units of the
bootstrap are prompts: a prompt counts when both arms answered it successfully.

* ``speedup_tps``: B's output tokens/s over A's, each computed per arm as the sum of
  output tokens over the sum of request latencies (end-to-end) across paired prompts;
  > 1 means B is faster.
* ``speedup_tpot``: A's mean TPOT over B's mean TPOT; > 1 means B is faster.
* At temperature 0 the texts of both arms must match per prompt. For each mismatch the
  first differing character is located and the top-2 logprob margin of arm A (the
  baseline) at the token covering that character tells a near-tie (a small margin:
  floating-point noise can flip it) from a real divergence. The margin is read from the
  logprobs arm A returned in the run itself when the run asked for them
  (``RequestConfig.top_logprobs``); otherwise arm A is asked again with logprobs. A
  re-ask runs alone, in another batch shape than the run, and batch shape alone can flip
  a near-tie, so the re-asked text may differ from the run's (``probe_text_matches_a``).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Sequence

import httpx
import numpy as np

from .client import send_request
from .config import Arm, RequestConfig
from .records import RequestRecord, TokenLogprob
from .stats import CI, bootstrap_ci, ratio_of_means, ratio_of_rates
from .workloads import Prompt

PROBE_TOP_LOGPROBS = 5


@dataclass(slots=True)
class Probe:
    """The baseline arm's logprobs at one mismatch: from the run ("in-run") or from
    asking it again ("re-asked")."""

    source: str = "re-asked"
    token_index: int | None = None
    token: str | None = None
    top: list[tuple[str, float]] = field(default_factory=list)
    margin: float | None = None       # top-1 minus top-2 logprob at token_index
    near_tie: bool | None = None      # margin < near_tie_margin
    margin_b: float | None = None     # arm B's own top-2 margin there (in-run only)
    probe_text_matches_a: bool | None = None
    error: str | None = None


ProbeCache = dict[tuple[int, int, str], Probe]


@dataclass(slots=True)
class Mismatch:
    prompt_id: str
    prompt_index: int
    first_diff_char: int
    context_a: str   # text around the first difference
    context_b: str
    probe: Probe | None = None


@dataclass(slots=True)
class ABLevel:
    arm_a: str
    arm_b: str
    pairs: int
    tps_a: float | None
    tps_b: float | None
    speedup_tps: CI | None
    tpot_a_ms: float | None
    tpot_b_ms: float | None
    speedup_tpot: CI | None
    mismatch_check: str                   # "done" or why it was skipped
    compared: int = 0
    identical: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)


def first_difference(a: str, b: str) -> int | None:
    """Index of the first differing character (the shorter length if one text is a
    prefix of the other); None when equal."""
    if a == b:
        return None
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def token_at_char(tokens: Sequence[TokenLogprob], char_index: int) -> int | None:
    """Index of the token whose text covers ``char_index`` of the concatenated text."""
    end = 0
    for i, t in enumerate(tokens):
        end += len(t.token)
        if char_index < end:
            return i
    return None


def top2_margin(entry: TokenLogprob) -> float | None:
    if len(entry.top) < 2:
        return None
    return entry.top[0][1] - entry.top[1][1]


def _first_ok(records: Sequence[RequestRecord], arm: str) -> dict[int, RequestRecord]:
    out: dict[int, RequestRecord] = {}
    for r in sorted(records, key=lambda r: r.request_id):
        if r.arm == arm and r.ok and r.prompt_index not in out:
            out[r.prompt_index] = r
    return out


def compare_speed(records: Sequence[RequestRecord], arm_a: str, arm_b: str, *,
                  n_resamples: int = 2000, seed: int = 0) -> ABLevel:
    """Speedups of B over A with bootstrap CIs over prompts (no mismatch check)."""
    per: dict[str, dict[int, list[RequestRecord]]] = {arm_a: defaultdict(list),
                                                       arm_b: defaultdict(list)}
    for r in records:
        if r.ok and r.arm in per and r.e2e_s:
            per[r.arm][r.prompt_index].append(r)
    keys = sorted(set(per[arm_a]) & set(per[arm_b]))

    def col(arm: str, f) -> np.ndarray:
        return np.array([f(per[arm][k]) for k in keys], dtype=float)

    tok_a, tok_b = (col(a, lambda rs: sum(r.output_tokens for r in rs)) for a in (arm_a, arm_b))
    sec_a, sec_b = (col(a, lambda rs: sum(r.e2e_s for r in rs)) for a in (arm_a, arm_b))
    tps = ratio_of_rates(tok_a, sec_a, tok_b, sec_b)
    speedup_tps = bootstrap_ci(tps, len(keys), n_resamples=n_resamples, seed=seed)

    def mean_tpot(rs: list[RequestRecord]) -> float:
        xs = [r.tpot_s for r in rs if r.tpot_s is not None]
        return sum(xs) / len(xs) if xs else float("nan")

    tp_a, tp_b = col(arm_a, mean_tpot), col(arm_b, mean_tpot)
    both = np.isfinite(tp_a) & np.isfinite(tp_b)
    tp_a, tp_b = tp_a[both], tp_b[both]
    speedup_tpot = bootstrap_ci(ratio_of_means(tp_a, tp_b), int(both.sum()),
                                n_resamples=n_resamples, seed=seed)
    return ABLevel(
        arm_a=arm_a, arm_b=arm_b, pairs=len(keys),
        tps_a=float(tok_a.sum() / sec_a.sum()) if keys else None,
        tps_b=float(tok_b.sum() / sec_b.sum()) if keys else None,
        speedup_tps=speedup_tps,
        tpot_a_ms=float(tp_a.mean() * 1000) if tp_a.size else None,
        tpot_b_ms=float(tp_b.mean() * 1000) if tp_b.size else None,
        speedup_tpot=speedup_tpot, mismatch_check="not run")


def find_mismatches(records: Sequence[RequestRecord], arm_a: str, arm_b: str,
                    prompts: Sequence[Prompt]) -> tuple[int, list[Mismatch]]:
    """(number of prompts compared, mismatches) over the first successful answer of
    each arm per prompt."""
    a, b = _first_ok(records, arm_a), _first_ok(records, arm_b)
    keys = sorted(set(a) & set(b))
    out = []
    for k in keys:
        pos = first_difference(a[k].text, b[k].text)
        if pos is not None:
            lo = max(0, pos - 20)
            out.append(Mismatch(prompt_id=prompts[k].id, prompt_index=k, first_diff_char=pos,
                                context_a=a[k].text[lo:pos + 20],
                                context_b=b[k].text[lo:pos + 20]))
    return len(keys), out


def _at_token(probe: Probe, tokens: Sequence[TokenLogprob], idx: int,
              near_tie_margin: float) -> Probe:
    """Fill ``probe`` with arm A's token ``idx``: its alternatives, margin and verdict."""
    entry = tokens[idx]
    probe.token_index, probe.token, probe.top = idx, entry.token, entry.top[:PROBE_TOP_LOGPROBS]
    probe.margin = top2_margin(entry)
    probe.near_tie = None if probe.margin is None else probe.margin < near_tie_margin
    return probe


def _judge(tokens: Sequence[TokenLogprob], char_index: int, near_tie_margin: float,
           probe: Probe) -> Probe:
    """Fill ``probe`` from the logprob entry covering ``char_index``."""
    if not tokens:
        probe.error = "server returned no logprobs"
        return probe
    idx = token_at_char(tokens, char_index)
    if idx is None:
        probe.error = "logprob tokens do not cover the differing character"
        return probe
    return _at_token(probe, tokens, idx, near_tie_margin)


def first_token_difference(a: Sequence[TokenLogprob], b: Sequence[TokenLogprob]) -> int | None:
    """Index of the first token whose text differs between two runs (None if the shorter
    is a prefix of the longer). Exact where a character search is not: for "Given a tree"
    vs "Given an array" the texts first differ at the space after "a", which starts A's
    token " tree", but the runs diverged one token earlier (" a" vs " an")."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x.token != y.token:
            return i
    return None


def judge_in_run(rec_a: RequestRecord, rec_b: RequestRecord, mismatch: Mismatch,
                 near_tie_margin: float) -> Probe | None:
    """The verdict from the logprobs both arms returned in the run (None when arm A's
    record has none: the run did not ask, or the server ignored the field). With both
    arms' tokens the margins are read at the first differing token; with A's alone, at
    A's token covering the first differing character."""
    toks_a, toks_b = rec_a.token_logprobs, rec_b.token_logprobs
    if not toks_a:
        return None
    probe = Probe(source="in-run", probe_text_matches_a=True)
    idx = first_token_difference(toks_a, toks_b) if toks_b else None
    if idx is None:
        return _judge(toks_a, mismatch.first_diff_char, near_tie_margin, probe)
    probe.margin_b = top2_margin(toks_b[idx])
    return _at_token(probe, toks_a, idx, near_tie_margin)


async def probe_mismatch(http: httpx.AsyncClient, arm: Arm, prompt: Prompt,
                         cfg: RequestConfig, mismatch: Mismatch, text_a: str,
                         near_tie_margin: float) -> Probe:
    """Ask ``arm`` again with logprobs; report the top-2 margin at the first difference."""
    rec = await send_request(http, arm, prompt, cfg, top_logprobs=PROBE_TOP_LOGPROBS)
    if not rec.ok:
        return Probe(error=f"probe request failed: {rec.error_type}: {rec.error_detail}")
    return _judge(rec.token_logprobs or [], mismatch.first_diff_char, near_tie_margin,
                  Probe(probe_text_matches_a=rec.text == text_a))


async def analyze_level(http: httpx.AsyncClient, records: Sequence[RequestRecord],
                        arm_a: Arm, arm_b: Arm, prompts: Sequence[Prompt],
                        cfg: RequestConfig, *, n_resamples: int = 2000, seed: int = 0,
                        near_tie_margin: float = 0.5, max_probes: int = 10,
                        probe_cache: ProbeCache | None = None) -> ABLevel:
    """Speedups with CIs, and (at temperature 0) the mismatch check: each mismatch is
    judged from the run's own logprobs when it has them, else by re-asking arm A (at most
    ``max_probes`` per level). ``probe_cache`` (keyed by prompt index, first difference
    and baseline text) avoids re-asking at the next level about an unchanged mismatch."""
    result = compare_speed(records, arm_a.name, arm_b.name, n_resamples=n_resamples,
                           seed=seed)
    if cfg.temperature != 0:
        result.mismatch_check = "skipped (temperature > 0)"
        return result
    result.compared, result.mismatches = find_mismatches(records, arm_a.name, arm_b.name,
                                                         prompts)
    result.identical = result.compared - len(result.mismatches)
    result.mismatch_check = "done"
    recs_a, recs_b = _first_ok(records, arm_a.name), _first_ok(records, arm_b.name)
    cache: ProbeCache = probe_cache if probe_cache is not None else {}
    reasked = 0
    for m in result.mismatches:
        m.probe = judge_in_run(recs_a[m.prompt_index], recs_b[m.prompt_index], m,
                               near_tie_margin)
        if m.probe is not None:
            continue
        if reasked >= max_probes:
            continue
        reasked += 1
        text_a = recs_a[m.prompt_index].text
        key = (m.prompt_index, m.first_diff_char, text_a)
        if key not in cache:
            cache[key] = await probe_mismatch(http, arm_a, prompts[m.prompt_index], cfg, m,
                                              text_a, near_tie_margin)
        m.probe = cache[key]
    return result
