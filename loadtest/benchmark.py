"""A whole run: resolve models, load the workload, warm up, then for every load level
scrape /metrics, run the level, scrape again, aggregate, and (A/B) compare the arms.

A/B with ``ab_schedule="separate"`` runs each level once per arm (a block each, arm
order alternating by level) and scrapes /metrics around each block, labelled by arm, so
each arm's throughput and counters are its own."""
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
from .runner import build_items, run_level
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
        if cfg.is_ab and cfg.ab_schedule == "separate":
            order = arms if i % 2 == 0 else arms[::-1]  # AB, BA, ...: drift hits both arms
            blocks = [(build_items(prompts, [arm], level.num_requests),
                       {arm.name: arm} if cfg.scrape_metrics else {}) for arm in order]
        else:
            blocks = [(build_items(prompts, arms, level.num_requests), targets)]
        records: list[RequestRecord] = []
        server_metrics: dict[str, dict[str, SpecDecodeStats] | None] = {}
        aggs: dict[str, ArmAggregate] = {}
        elapsed = 0.0
        for b, (items, block_targets) in enumerate(blocks):
            before = await _scrape_all(http, block_targets)
            bar = ProgressLine(level.label if len(blocks) == 1 else
                               f"{level.label} {items[0].arm.name}", len(items),
                               enabled=progress)
            run = await run_level(http, items, level, cfg.request, seed=cfg.seed + i,
                                  on_record=bar.update)
            bar.close()
            after = await _scrape_all(http, block_targets)
            server_metrics.update({
                label: (spec_decode_stats(counter_deltas(before[label], after[label]))
                        if before[label] is not None and after[label] is not None else None)
                for label in block_targets})
            block_arms = {it.arm.name for it in items}
            aggs.update({a.name: aggregate(run.records, a.name, run.elapsed_s,
                                           slo_ttft_ms=cfg.slo_ttft_ms,
                                           slo_tpot_ms=cfg.slo_tpot_ms)
                         for a in arms if a.name in block_arms})
            offset = b * len(items)  # request ids stay unique across a level's blocks
            for r in run.records:
                r.request_id += offset
            records += run.records
            elapsed += run.elapsed_s
        aggs = {a.name: aggs[a.name] for a in arms}
        ab = None
        if cfg.is_ab:
            ab = await analyze_level(http, records, arms[0], arms[1], prompts, cfg.request,
                                     n_resamples=cfg.bootstrap_resamples, seed=cfg.seed,
                                     near_tie_margin=cfg.near_tie_margin,
                                     max_probes=cfg.max_mismatch_probes,
                                     probe_cache=probe_cache)
        result.levels.append(LevelResult(level=level, elapsed_s=elapsed, arms=aggs,
                                         server_metrics=server_metrics, ab=ab,
                                         records=sorted(records, key=lambda r: r.request_id)))
    return result
