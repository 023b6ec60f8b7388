"""A whole run: resolve models, load the workload, warm up, then for every load level
scrape /metrics, run the level, scrape again, aggregate, and (A/B) compare the arms.

A/B with ``ab_schedule="separate"`` runs each level once per arm (a block each, arm
order alternating by level) and scrapes /metrics around each block, labelled by arm, so
each arm's throughput and counters are its own. ``"alternating"`` splits each level into
``ab_blocks`` chunks of its requests, each run by one arm then the other (ABBA...); an
arm's wall time and counters are the sums over its blocks."""
from __future__ import annotations

import dataclasses
import datetime as _dt
from dataclasses import dataclass, field
from typing import Sequence

import httpx

from .ab import ABLevel, ProbeCache, analyze_level
from .aggregate import ArmAggregate, aggregate
from .config import Arm, BenchmarkConfig, LoadLevel
from .progress import ProgressLine
from .prom import SpecDecodeStats, counter_deltas, scrape, spec_decode_stats
from .records import RequestRecord
from .runner import WorkItem, build_items, run_level
from .workloads import load_workload


@dataclass(slots=True)
class LevelResult:
    level: LoadLevel
    elapsed_s: float
    arms: dict[str, ArmAggregate]
    # per metrics target: stats per metric family; None = endpoint missing ("n/a")
    server_metrics: dict[str, dict[str, SpecDecodeStats] | None]
    ab: ABLevel | None
    records: list[RequestRecord] = field(default_factory=list)
    # alternating schedule: per chunk, B's output tok/s over A's (both ran the same
    # requests back to back). Their spread is the machine's drift between chunks, which
    # the bootstrap over prompts does not see (an A/A run read 0.91 [0.89, 0.92] on 2 cores).
    chunk_speedups: list[float] = field(default_factory=list)


@dataclass(slots=True)
class BenchmarkResult:
    config: BenchmarkConfig
    started_at: str
    prompt_ids: list[str]
    warmup_errors: int
    levels: list[LevelResult] = field(default_factory=list)


def make_http_client(cfg: BenchmarkConfig) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        timeout=httpx.Timeout(cfg.request.timeout_s),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
        trust_env=cfg.trust_env)


async def resolve_model(http: httpx.AsyncClient, arm: Arm, timeout_s: float = 30.0) -> Arm:
    """The arm with ``model`` set: as given, else the first id of GET /v1/models."""
    if arm.model:
        return arm
    url = arm.api_root + "/models"
    try:
        resp = await http.get(url, headers=arm.headers(), timeout=timeout_s)
        resp.raise_for_status()
        model = resp.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as e:
        raise ValueError(f"arm {arm.name}: cannot read a model id from {url} "
                         f"({type(e).__name__}: {e}); pass --model") from None
    return dataclasses.replace(arm, model=str(model))


def metrics_targets(arms: Sequence[Arm]) -> dict[str, Arm]:
    """Label -> arm whose metrics URL to scrape (one per distinct URL)."""
    urls: dict[str, Arm] = {}
    for arm in arms:
        urls.setdefault(arm.resolved_metrics_url, arm)
    if len(urls) == 1:
        return {"server": next(iter(urls.values()))}
    return {arm.name: arm for arm in urls.values()}


async def _scrape_all(http: httpx.AsyncClient, targets: dict[str, Arm]):
    return {label: await scrape(http, arm.resolved_metrics_url, headers=arm.headers())
            for label, arm in targets.items()}


def _blocks(cfg: BenchmarkConfig, arms: tuple[Arm, ...], prompts, level: LoadLevel, i: int,
            targets: dict[str, Arm]) -> list[tuple[list[WorkItem], dict[str, Arm]]]:
    """The level's runs, in order: (work items, metrics targets to scrape around them)."""
    if not cfg.is_ab or cfg.ab_schedule == "interleaved":
        return [(build_items(prompts, arms, level.num_requests), targets)]
    own = lambda arm: {arm.name: arm} if cfg.scrape_metrics else {}  # noqa: E731
    if cfg.ab_schedule == "separate":
        order = arms if i % 2 == 0 else arms[::-1]  # AB, BA, ...: drift hits both arms
        return [(build_items(prompts, [arm], level.num_requests), own(arm)) for arm in order]
    # alternating: chunk k of the requests by both arms, ABBA ABBA ...
    base = build_items(prompts, arms[:1], level.num_requests)
    chunks = min(cfg.ab_blocks, len(base))
    if level.mode == "closed":  # a chunk of fewer requests than the concurrency runs below it
        chunks = max(1, min(chunks, len(base) // int(level.value)))
    size = -(-len(base) // chunks)
    out = []
    for k, s in enumerate(range(0, len(base), size)):
        chunk = base[s:s + size]
        order = arms if k % 2 == 0 else arms[::-1]
        out += [([WorkItem(it.prompt, it.prompt_index, arm) for it in chunk], own(arm))
                for arm in order]
    return out


def chunk_speedups(block_rates: list[tuple[str, float]], a: str, b: str) -> list[float]:
    """Alternating schedule: blocks come in pairs (one chunk run by both arms, ABBA...):
    per pair, arm b's output tok/s over arm a's."""
    out = []
    for i in range(0, len(block_rates) - 1, 2):
        rates = dict(block_rates[i:i + 2])
        if rates.get(a, 0.0) > 0 and b in rates:
            out.append(rates[b] / rates[a])
    return out


def _summed(a: dict | None, b: dict | None) -> dict | None:
    """Counter deltas of two blocks added (None, a missing endpoint, wins)."""
    if a is None or b is None:
        return None
    return {k: a.get(k, 0.0) + b.get(k, 0.0) for k in a.keys() | b.keys()}


async def run_benchmark(cfg: BenchmarkConfig, *, progress: bool = True,
                        http: httpx.AsyncClient | None = None) -> BenchmarkResult:
    own_client = http is None
    http = http or make_http_client(cfg)
    try:
        return await _run(cfg, http, progress)
    finally:
        if own_client:
            await http.aclose()


async def _run(cfg: BenchmarkConfig, http: httpx.AsyncClient, progress: bool) -> BenchmarkResult:
    arms = tuple([await resolve_model(http, a) for a in cfg.arms])
    cfg = dataclasses.replace(cfg, arms=arms)
    prompts = load_workload(cfg.workload, num_prompts=cfg.num_prompts, seed=cfg.seed)
    result = BenchmarkResult(config=cfg, prompt_ids=[p.id for p in prompts], warmup_errors=0,
                             started_at=_dt.datetime.now(_dt.timezone.utc).isoformat())
    if cfg.warmup:
        warm = LoadLevel("closed", len(arms), cfg.warmup,
                         duration_s=cfg.warmup * len(arms) * cfg.request.timeout_s)
        bar = ProgressLine("warmup", cfg.warmup * len(arms), enabled=progress)
        run = await run_level(http, build_items(prompts, arms, cfg.warmup), warm, cfg.request,
                              seed=cfg.seed, on_record=bar.update)
        bar.close()
        result.warmup_errors = sum(not r.ok for r in run.records)
    targets = metrics_targets(arms) if cfg.scrape_metrics else {}
    probe_cache: ProbeCache = {}
    for i, level in enumerate(cfg.levels):
        blocks = _blocks(cfg, arms, prompts, level, i, targets)
        records: list[RequestRecord] = []
        deltas: dict[str, dict | None] = {}  # metrics label -> summed counter deltas
        arm_elapsed = dict.fromkeys((a.name for a in arms), 0.0)
        elapsed = 0.0
        block_rates: list[tuple[str, float]] = []  # (arm, output tok/s) per block
        for b, (items, block_targets) in enumerate(blocks):
            before = await _scrape_all(http, block_targets)
            bar = ProgressLine(level.label if len(blocks) == 1 else
                               f"{level.label} {items[0].arm.name} {b + 1}/{len(blocks)}",
                               len(items), enabled=progress)
            run = await run_level(http, items, level, cfg.request, seed=cfg.seed + i,
                                  on_record=bar.update)
            bar.close()
            after = await _scrape_all(http, block_targets)
            for label in block_targets:
                d = (counter_deltas(before[label], after[label])
                     if before[label] is not None and after[label] is not None else None)
                deltas[label] = _summed(deltas[label], d) if label in deltas else d
            for name in {it.arm.name for it in items}:
                arm_elapsed[name] += run.elapsed_s  # the arm's own wall time
            for r in run.records:  # request ids stay unique across a level's blocks
                r.request_id += len(records)
            records += run.records
            elapsed += run.elapsed_s
            if len({it.arm.name for it in items}) == 1:
                tokens = sum(r.output_tokens for r in run.records if r.ok)
                block_rates.append((items[0].arm.name, tokens / max(run.elapsed_s, 1e-9)))
        server_metrics: dict[str, dict[str, SpecDecodeStats] | None] = {
            label: None if d is None else spec_decode_stats(d) for label, d in deltas.items()}
        aggs = {a.name: aggregate(records, a.name, arm_elapsed[a.name],
                                  slo_ttft_ms=cfg.slo_ttft_ms, slo_tpot_ms=cfg.slo_tpot_ms)
                for a in arms}
        ab = None
        if cfg.is_ab:
            ab = await analyze_level(http, records, arms[0], arms[1], prompts, cfg.request,
                                     n_resamples=cfg.bootstrap_resamples, seed=cfg.seed,
                                     near_tie_margin=cfg.near_tie_margin,
                                     max_probes=cfg.max_mismatch_probes,
                                     probe_cache=probe_cache)
        chunks = (chunk_speedups(block_rates, arms[0].name, arms[1].name)
                  if cfg.is_ab and cfg.ab_schedule == "alternating" else [])
        result.levels.append(LevelResult(level=level, elapsed_s=elapsed, arms=aggs,
                                         server_metrics=server_metrics, ab=ab,
                                         records=sorted(records, key=lambda r: r.request_id),
                                         chunk_speedups=chunks))
    return result
