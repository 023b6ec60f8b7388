"""Load generation: one load level, closed loop (fixed concurrency) or open loop
(Poisson arrivals). Bounded by the number of work items and by ``duration_s``: when
the duration runs out no new request starts and requests still in flight are
cancelled and recorded with ``error_type="cancelled"``.
"""
from __future__ import annotations

import asyncio
import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import httpx

from .client import send_request
from .config import Arm, LoadLevel, RequestConfig
from .records import RequestRecord
from .workloads import Prompt


@dataclass(frozen=True, slots=True)
class WorkItem:
    """One request to send: a prompt (with its index in the workload) to one arm."""

    prompt: Prompt
    prompt_index: int
    arm: Arm


@dataclass(slots=True)
class LevelRun:
    """Raw outcome of one level: records in completion order and the wall time."""

    level: LoadLevel
    records: list[RequestRecord] = field(default_factory=list)
    elapsed_s: float = 0.0


def build_items(prompts: Sequence[Prompt], arms: Sequence[Arm],
                num_requests: int) -> list[WorkItem]:
    """``num_requests`` prompts (cycling through the workload), each sent to every arm.
    With two arms the order alternates per prompt (A,B then B,A, ...) so both arms see
    the same load and drift."""
    if not prompts or not arms:
        raise ValueError("need prompts and arms")
    items = []
    for k in range(num_requests):
        idx = k % len(prompts)
        order = list(arms) if k % 2 == 0 else list(reversed(arms))
        items.extend(WorkItem(prompts[idx], idx, arm) for arm in order)
    return items


def poisson_arrivals(n: int, rate: float, seed: int) -> list[float]:
    """Arrival offsets (s) of ``n`` requests at ``rate``/s; all 0 when rate is inf."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


OnRecord = Callable[[RequestRecord], None]


class _Level:
    """Shared state of one running level."""

    def __init__(self, http: httpx.AsyncClient, cfg: RequestConfig, level: LoadLevel,
                 on_record: OnRecord | None) -> None:
        self.http, self.cfg, self.level, self.on_record = http, cfg, level, on_record
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + level.duration_s
        self.records: list[RequestRecord] = []
        self.inflight: dict[int, tuple[WorkItem, float]] = {}

    async def send(self, request_id: int, item: WorkItem) -> None:
        self.inflight[request_id] = (item, time.perf_counter())
        rec = await send_request(self.http, item.arm, item.prompt, self.cfg,
                                 request_id=request_id, level=self.level.label,
                                 prompt_index=item.prompt_index, level_t0=self.t0)
        del self.inflight[request_id]
        self._add(rec)

    def _add(self, rec: RequestRecord) -> None:
        self.records.append(rec)
        if self.on_record is not None:
            self.on_record(rec)

    async def finish(self, tasks: Sequence[asyncio.Task[None]]) -> None:
        """Wait for ``tasks`` until the deadline, cancel the rest, record cancellations."""
        if tasks:
            remaining = max(0.0, self.deadline - time.perf_counter())
            done, pending = await asyncio.wait(tasks, timeout=remaining)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for task in done:
                task.result()  # surface bugs; request failures are records, not exceptions
        now = time.perf_counter()
        for request_id, (item, started) in sorted(self.inflight.items()):
            self._add(RequestRecord(
                request_id=request_id, level=self.level.label, arm=item.arm.name,
                prompt_id=item.prompt.id, prompt_index=item.prompt_index,
                start_s=started - self.t0, e2e_s=now - started, error_type="cancelled",
                error_detail=f"still running at the end of --duration {self.level.duration_s}s"))
        self.inflight.clear()


async def _closed_loop(state: _Level, items: Sequence[WorkItem]) -> None:
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < len(items) and time.perf_counter() < state.deadline:
            request_id = next_index
            next_index += 1
            await state.send(request_id, items[request_id])

    workers = [asyncio.create_task(worker()) for _ in range(int(state.level.value))]
    await state.finish(workers)


async def _open_loop(state: _Level, items: Sequence[WorkItem], seed: int) -> None:
    tasks: list[asyncio.Task[None]] = []
    for request_id, (item, at) in enumerate(
            zip(items, poisson_arrivals(len(items), state.level.value, seed))):
        start = state.t0 + at
        if start >= state.deadline:
            break
        delay = start - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(state.send(request_id, item)))
    await state.finish(tasks)


async def run_level(http: httpx.AsyncClient, items: Sequence[WorkItem], level: LoadLevel,
                    cfg: RequestConfig, *, seed: int = 0,
                    on_record: OnRecord | None = None) -> LevelRun:
    """Send ``items`` at ``level`` (all of them unless ``duration_s`` runs out first).

    Closed loop: ``level.value`` workers each send their next item as soon as their
    previous request ends. Open loop: items start at Poisson arrival times with rate
    ``level.value`` (seeded by ``seed``), regardless of how many are in flight.
    """
    state = _Level(http, cfg, level, on_record)
    if level.mode == "closed":
        await _closed_loop(state, items)
    else:
        await _open_loop(state, items, seed)
    return LevelRun(level=level, records=state.records,
                    elapsed_s=time.perf_counter() - state.t0)
