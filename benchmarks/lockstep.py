"""Engines stepped in lockstep, for A/B scripts that compare engine variants in one process
(step_host_ab.py, padded_rows_ab.py): one decode step of each in turn, the order rotating,
so the noisy VMs here slow every variant alike; each request restarts once any engine's run
ends, an engine a step behind finishing untimed. Then a table of each variant's median ms
per step and the median (and quartiles) of its per-step ratio to the first."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from mtpserve.decoding.config import SamplingParams
from mtpserve.decoding.engine.llm_engine import LLMEngine
from mtpserve.decoding.tools.bench.runs import start_decoding


def run_lockstep(engines: dict[str, LLMEngine], prompts: list[list[int]],
                 params: SamplingParams, steps: int,
                 before_step: Callable[[str], None] = lambda name: None,
                 ) -> tuple[dict[str, list[float]], dict[str, list[list[int]]]]:
    """`steps` timed decode steps of each engine -> (ms per step, every finished request's
    greedy tokens) per engine name; `before_step(name)` runs untimed before each step."""
    names = list(engines)

    def step(name: str) -> float:
        before_step(name)
        t0 = time.perf_counter()
        engines[name].step()
        return 1000 * (time.perf_counter() - t0)

    ms: dict[str, list[float]] = {n: [] for n in names}
    tokens: dict[str, list[list[int]]] = {n: [] for n in names}
    seqs: dict[str, list] = {}

    def finish(name: str) -> None:
        while engines[name].has_unfinished():
            step(name)
        if name in seqs:
            tokens[name] += [list(s.output_ids) for s in seqs[name]]

    rnd = 0
    while len(ms[names[0]]) < steps:
        if not seqs or any(not e.has_unfinished() for e in engines.values()):
            for n, e in engines.items():
                finish(n)
                seqs[n] = start_decoding(e, prompts, params)
        for n in names[rnd % len(names):] + names[:rnd % len(names)]:
            ms[n].append(step(n))
        rnd += 1
    for n in names:
        finish(n)
    return ms, tokens


def print_ratio_table(ms: dict[str, list[float]], label: str = "variant") -> None:
    names = list(ms)
    print(f"\n| {label} | median ms/step | ratio to {names[0]} (median of per-step pairs) "
          "| quartiles |")
    print("|---|---|---|---|")
    for n in names:
        r = sorted(a / b for a, b in zip(ms[n], ms[names[0]]))
        q1, q3 = r[len(r) // 4], r[3 * len(r) // 4]
        print(f"| {n} | {statistics.median(ms[n]):.2f} | {statistics.median(r):.3f} "
              f"| {q1:.3f}-{q3:.3f} |")
