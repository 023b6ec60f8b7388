"""Reports of a run: ``results.json`` (everything) and ``summary.md`` (tables)."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Sequence

from .benchmark import BenchmarkResult, LevelResult
from .config import BenchmarkConfig
from .stats import CI, Dist

NA = "n/a"


def to_jsonable(x: Any) -> Any:
    """Dataclasses, dicts, sequences -> JSON types; NaN -> None, inf -> "inf"."""
    if hasattr(x, "to_dict"):
        return to_jsonable(x.to_dict())
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: to_jsonable(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


def config_dict(cfg: BenchmarkConfig) -> dict[str, Any]:
    out = to_jsonable(cfg)
    for arm in out["arms"]:
        if arm.get("api_key"):
            arm["api_key"] = "***"
    for level, src in zip(out["levels"], cfg.levels):
        level["label"] = src.label
    return out


def results_dict(result: BenchmarkResult) -> dict[str, Any]:
    levels = []
    for lv in result.levels:
        d = {f.name: to_jsonable(getattr(lv, f.name)) for f in dataclasses.fields(lv)
             if f.name != "records"}
        d["level"]["label"] = lv.level.label
        levels.append(d)
    requests = [{k: v for k, v in to_jsonable(r).items() if k != "token_logprobs"}
                for lv in result.levels for r in lv.records]
    return {"tool": "mtpserve-loadtest", "started_at": result.started_at,
            "config": config_dict(result.config), "prompt_ids": result.prompt_ids,
            "warmup_errors": result.warmup_errors, "levels": levels, "requests": requests}


def write_json(result: BenchmarkResult, out_dir: Path) -> Path:
    path = out_dir / "results.json"
    path.write_text(json.dumps(results_dict(result), indent=1) + "\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------- markdown helpers
def fmt(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return NA
    return f"{x:.{digits}f}"


def fmt_ci(ci: CI | None, digits: int = 3) -> str:
    if ci is None:
        return NA
    return f"{ci.point:.{digits}f} [{ci.lo:.{digits}f}, {ci.hi:.{digits}f}]"


def fmt_list(xs: Sequence[float | None], digits: int = 3) -> str:
    return " / ".join(fmt(x, digits) for x in xs) if xs else NA


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |"
              for row in rows]
    return lines + [""]


def _dist_row(label: Sequence[str], name: str, d: Dist) -> list[str]:
    return [*label, name, str(d.n), fmt(d.mean), fmt(d.p50), fmt(d.p90), fmt(d.p99)]


# ----------------------------------------------------------------- sections
def _header(result: BenchmarkResult) -> list[str]:
    cfg = result.config
    r = cfg.request
    lines = ["# mtpserve-loadtest summary", "",
             f"- started: {result.started_at}",
             f"- workload: `{cfg.workload}`, {len(result.prompt_ids)} prompts, seed {cfg.seed}, "
             f"warm-up {cfg.warmup} request(s) per arm ({result.warmup_errors} failed)",
             f"- endpoint: `{r.endpoint}`, max_tokens {r.max_tokens}, temperature "
             f"{r.temperature:g}, ignore_eos {r.ignore_eos}, timeout {r.timeout_s:g}s",
             f"- SLOs: TTFT {fmt(cfg.slo_ttft_ms, 0)} ms, TPOT {fmt(cfg.slo_tpot_ms, 0)} ms"]
    for arm in cfg.arms:
        extra = json.dumps(arm.extra_body) if arm.extra_body else "{}"
        lines.append(f"- arm **{arm.name}**: {arm.base_url}, model `{arm.model}`, "
                     f"extra body `{extra}`")
    if r.extra_body:
        lines.append(f"- extra body (all requests): `{json.dumps(r.extra_body)}`")
    if cfg.is_ab:
        blocks = (f" ({cfg.ab_blocks} blocks per arm and level, ABBA..., fewer where a "
                  "block would hold fewer requests than the concurrency)"
                  if cfg.ab_schedule == "alternating" else "")
        lines.append(f"- A/B schedule: {cfg.ab_schedule}{blocks}")
    if r.top_logprobs:
        lines.append(f"- every request asked for top-{r.top_logprobs} logprobs (both arms)")
    return lines + [""]


def _throughput(levels: Sequence[LevelResult], shared_wall: bool) -> list[str]:
    rows = []
    for lv in levels:
        for a in lv.arms.values():
            errs = sum(a.errors.values())
            good = (NA if a.goodput_rps is None
                    else f"{a.goodput_rps:.2f} ({a.goodput_requests}/{a.num_ok})")
            rows.append([lv.level.label, a.arm, str(a.num_ok), str(errs), str(a.num_cancelled),
                         fmt(a.elapsed_s, 1), fmt(a.request_throughput),
                         fmt(a.output_throughput, 1), good, fmt(a.output_tokens.mean, 1)])
    note = []
    if shared_wall and any(len(lv.arms) > 1 for lv in levels):
        note = ["In A/B mode both arms share each level's wall time, so compare the arms in "
                "the A/B table below, not here.", ""]
    return ["## Throughput", ""] + note + table(
        ["level", "arm", "ok", "errors", "cancelled", "wall s", "req/s", "output tok/s",
         "goodput req/s (good/ok)", "mean output tokens"], rows)


def _latency(levels: Sequence[LevelResult]) -> list[str]:
    rows = []
    for lv in levels:
        for a in lv.arms.values():
            label = [lv.level.label, a.arm]
            rows += [_dist_row(label, "TTFT", a.ttft_ms), _dist_row(label, "TPOT", a.tpot_ms),
                     _dist_row(label, "ITL", a.itl_ms), _dist_row(label, "E2E", a.e2e_ms)]
    return ["## Latency (ms, successful requests)", ""] + table(
        ["level", "arm", "metric", "n", "mean", "p50", "p90", "p99"], rows)


def _errors(levels: Sequence[LevelResult]) -> list[str]:
    rows = [[lv.level.label, a.arm, etype, str(n)]
            for lv in levels for a in lv.arms.values() for etype, n in a.errors.items()]
    if not rows:
        return ["## Errors", "", "none", ""]
    return ["## Errors", ""] + table(["level", "arm", "type", "count"], rows)


def _server_spec(levels: Sequence[LevelResult]) -> list[str]:
    rows = []
    for lv in levels:
        if not lv.server_metrics:
            rows.append([lv.level.label, NA, NA] + [NA] * 7)
        for target, fams in lv.server_metrics.items():
            if not fams:
                why = "no /metrics" if fams is None else "no spec-decode metrics"
                rows.append([lv.level.label, target, why] + [NA] * 7)
                continue
            for s in fams.values():
                rows.append([lv.level.label, target, s.source, fmt(s.num_drafts, 0),
                             fmt(s.num_draft_tokens, 0), fmt(s.num_accepted_tokens, 0),
                             fmt(s.acceptance_rate, 3), fmt(s.mean_accepted_per_step, 3),
                             fmt(s.mean_acceptance_length, 3),
                             fmt_list(s.acceptance_per_position)])
    return ["## Speculative decoding, server counters (/metrics deltas per level)", ""] + table(
        ["level", "target", "source", "drafts (steps)", "draft tokens", "accepted tokens",
         "acceptance rate", "accepted per step", "mean acceptance length (incl. bonus)",
         "acceptance per position"], rows)


def _client_spec(levels: Sequence[LevelResult]) -> list[str]:
    rows = []
    for lv in levels:
        for a in lv.arms.values():
            s = a.client_spec
            if s is None:
                continue
            rows.append([lv.level.label, a.arm, str(s.requests), fmt(s.num_spec_steps, 0),
                         fmt(s.draft_acceptance_rate, 3), fmt(s.mean_acceptance_length, 3),
                         fmt_list(s.acceptance_rate_per_position),
                         ", ".join(s.acceptance_rules) or NA])
    if not rows:
        return []
    return ["## Speculative decoding, per-request `metrics.speculative_decoding`", ""] + table(
        ["level", "arm", "requests", "steps", "draft acceptance rate",
         "mean acceptance length", "acceptance per position", "rule"], rows)


def _ab(result: BenchmarkResult) -> list[str]:
    levels = [lv for lv in result.levels if lv.ab is not None]
    if not levels:
        return []
    a_name, b_name = (arm.name for arm in result.config.arms)
    rows = []
    for lv in levels:
        ab = lv.ab
        check = (f"{ab.identical}/{ab.compared} identical" if ab.mismatch_check == "done"
                 else ab.mismatch_check)
        chunks = lv.chunk_speedups
        spread = (f"{min(chunks):.3f}-{max(chunks):.3f} ({len(chunks)})" if chunks else NA)
        rows.append([lv.level.label, str(ab.pairs), fmt(ab.tps_a, 1), fmt(ab.tps_b, 1),
                     fmt_ci(ab.speedup_tps), spread, fmt(ab.tpot_a_ms), fmt(ab.tpot_b_ms),
                     fmt_ci(ab.speedup_tpot), check])
    lines = [f"## A/B: {b_name} vs {a_name}", "",
             f"Speedup > 1 means {b_name} is faster. Output tok/s per arm = sum of output "
             "tokens / sum of request latencies over prompts both arms answered; "
             f"TPOT speedup = mean TPOT {a_name} / mean TPOT {b_name}. Brackets: 95% "
             f"bootstrap CI over prompts ({result.config.bootstrap_resamples} resamples, "
             f"seed {result.config.seed}). Per chunk (alternating schedule): {b_name}'s "
             f"output tok/s over {a_name}'s on the same requests, lowest-highest (chunks): "
             "the machine's drift between chunks, which the CI over prompts does not "
             "include; a speedup inside that range is not resolved.", ""]
    lines += table(["level", "prompts", f"tok/s {a_name}", f"tok/s {b_name}",
                    "speedup tok/s [95% CI]", "per chunk", f"TPOT {a_name} ms", f"TPOT {b_name} ms",
                    "speedup TPOT [95% CI]", "temperature-0 text check"], rows)
    mism = [(lv, m) for lv in levels for m in lv.ab.mismatches]
    if mism:
        mrows = []
        for lv, m in mism:
            p = m.probe
            if p is None:
                probe = [NA, NA, NA, NA, NA, "not probed"]
            else:
                tops = ", ".join(f"{t!r}: {lp:.3f}" for t, lp in p.top[:2]) or NA
                probe = [p.source, repr(p.token) if p.token is not None else NA, tops,
                         fmt(p.margin, 3), fmt(p.margin_b, 3),
                         p.error or ("near tie" if p.near_tie else
                                     "NOT a near tie" if p.near_tie is False else NA)]
            mrows.append([lv.level.label, m.prompt_id, str(m.first_diff_char),
                          repr(m.context_a), repr(m.context_b), *probe])
        lines += [f"### Mismatching outputs (temperature 0; near tie when {a_name}'s top-2 "
                  f"logprob margin there < {result.config.near_tie_margin:g}; logprobs from "
                  f"the run itself (in-run) or from asking {a_name} again (re-asked))", ""]
        lines += table(["level", "prompt", "first diff char", f"{a_name} text", f"{b_name} text",
                        "logprobs", f"{a_name} token there", "top-2 logprobs",
                        f"margin {a_name}", f"margin {b_name}", "verdict"], mrows)
    return lines


def markdown_summary(result: BenchmarkResult) -> str:
    lines = _header(result)
    lines += _throughput(result.levels, result.config.ab_schedule == "interleaved")
    lines += _latency(result.levels)
    lines += _errors(result.levels)
    lines += _server_spec(result.levels)
    lines += _client_spec(result.levels)
    lines += _ab(result)
    lines += ["Notes: TTFT = time to the first token-bearing SSE event; ITL spreads the gap "
              "before an event evenly over the tokens it carries (counted from per-chunk "
              "usage, else logprobs, else by character share of the final usage count); "
              "TPOT = (last token time - TTFT) / (tokens - 1).", ""]
    return "\n".join(lines)


def write_markdown(result: BenchmarkResult, out_dir: Path) -> Path:
    path = out_dir / "summary.md"
    path.write_text(markdown_summary(result), encoding="utf-8")
    return path
