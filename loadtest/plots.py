"""PNG plots of a run (matplotlib, part of the default install; imported lazily).

latency_cdf.png            CDFs of TTFT, TPOT, ITL, E2E per level and arm
throughput.png             output tok/s and TTFT p50/p99 vs load (closed and open loop)
speedup.png                A/B speedup (tok/s and TPOT) with 95% CIs vs load
acceptance_per_position.png  acceptance rate per draft position per level
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Sequence

from .benchmark import BenchmarkResult, LevelResult


def matplotlib_missing() -> str | None:
    """None when matplotlib imports, else a message saying how to get plots."""
    if importlib.util.find_spec("matplotlib") is None:
        return ("matplotlib is not installed: skipping plots "
                "(pip install matplotlib)")
    return None


def _pyplot() -> Any:
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _cdf(ax: Any, values: Sequence[float], label: str) -> None:
    xs = sorted(values)
    if xs:
        ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=label)


def _latency_cdf(plt: Any, levels: Sequence[LevelResult], path: Path) -> Path:
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    metrics = [("TTFT", lambda r: [r.ttft_s]), ("TPOT", lambda r: [r.tpot_s]),
               ("ITL", lambda r: r.itl_s), ("E2E", lambda r: [r.e2e_s])]
    for ax, (name, get) in zip(axes.flat, metrics):
        for lv in levels:
            for arm in lv.arms:
                vals = [x * 1000 for r in lv.records if r.ok and r.arm == arm
                        for x in get(r) if x is not None]
                label = lv.level.label + (f" {arm}" if len(lv.arms) > 1 else "")
                _cdf(ax, vals, label)
        ax.set(title=f"{name} CDF", xlabel="ms", ylabel="fraction of samples", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _throughput(plt: Any, levels: Sequence[LevelResult], path: Path) -> Path:
    modes = [m for m in ("closed", "open") if any(lv.level.mode == m for lv in levels)]
    fig, axes = plt.subplots(len(modes), 2, figsize=(11, 4 * len(modes)), squeeze=False)
    for row, mode in zip(axes, modes):
        mine = [lv for lv in levels if lv.level.mode == mode]
        xlabel = "concurrency" if mode == "closed" else "request rate (req/s)"
        xs = list(range(len(mine)))  # categorical: levels may be 1,2,4,8 or include inf
        arms = list(mine[0].arms)
        if len(arms) == 1:
            row[0].plot(xs, [lv.arms[arms[0]].output_throughput for lv in mine], "o-",
                        label=arms[0])
        else:  # both arms share the wall time: show the total and each arm's own rate
            row[0].plot(xs, [sum(a.output_throughput or 0 for a in lv.arms.values())
                             for lv in mine], "o-", label="all requests (both arms)")
            for arm, get in ((arms[0], lambda ab: ab.tps_a), (arms[1], lambda ab: ab.tps_b)):
                row[0].plot(xs, [get(lv.ab) if lv.ab else None for lv in mine], "s--",
                            label=f"{arm}: tokens / request latency")
        for arm in arms:
            aggs = [lv.arms[arm] for lv in mine]
            row[1].plot(xs, [a.ttft_ms.p50 for a in aggs], "o-", label=f"{arm} p50")
            row[1].plot(xs, [a.ttft_ms.p99 for a in aggs], "x--", label=f"{arm} p99")
        row[0].set(title=f"output tokens/s vs {xlabel}", xlabel=xlabel, ylabel="tok/s")
        row[1].set(title=f"TTFT vs {xlabel}", xlabel=xlabel, ylabel="ms")
        for ax in row:
            ax.set_xticks(xs, [lv.level.label.split("=")[1] for lv in mine])
            ax.set_xlim(-0.5, len(mine) - 0.5)
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _speedup(plt: Any, levels: Sequence[LevelResult], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ab = [lv for lv in levels if lv.ab is not None]
    labels = [lv.level.label for lv in ab]
    for offset, name, get in ((-0.1, "tok/s", lambda a: a.speedup_tps),
                              (0.1, "TPOT", lambda a: a.speedup_tpot)):
        pts = [(i + offset, get(lv.ab)) for i, lv in enumerate(ab) if get(lv.ab) is not None]
        if pts:
            ax.errorbar([x for x, _ in pts], [c.point for _, c in pts],
                        yerr=[[c.point - c.lo for _, c in pts], [c.hi - c.point for _, c in pts]],
                        fmt="o", capsize=4, label=f"speedup {name} (95% CI)")
    ax.axhline(1.0, color="grey", lw=1)
    ax.set_xticks(range(len(labels)), labels)
    ax.set(title="A/B speedup (B over A)", xlabel="load level", ylabel="ratio")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _acceptance_series(lv: LevelResult) -> list[tuple[str, list[float]]]:
    series = []
    for target, fams in (lv.server_metrics or {}).items():
        for s in (fams or {}).values():
            rates = s.acceptance_per_position
            if rates and all(r is not None for r in rates):
                series.append((f"{lv.level.label} {target} {s.source}", rates))
    if not series:
        for a in lv.arms.values():
            if a.client_spec and a.client_spec.acceptance_rate_per_position:
                series.append((f"{lv.level.label} {a.arm} (responses)",
                               a.client_spec.acceptance_rate_per_position))
    return series


def _acceptance(plt: Any, levels: Sequence[LevelResult], path: Path) -> Path | None:
    series = [s for lv in levels for s in _acceptance_series(lv)]
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(series)
    for k, (label, rates) in enumerate(series):
        ax.bar([i + k * width for i in range(len(rates))], rates, width=width, label=label)
    npos = max(len(r) for _, r in series)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(npos)], [str(i) for i in range(npos)])
    ax.set(title="acceptance rate per draft position", xlabel="position", ylabel="rate",
           ylim=(0, 1.05))
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_plots(result: BenchmarkResult, out_dir: Path) -> list[Path]:
    """Write the plots; raises ImportError when matplotlib is missing."""
    plt = _pyplot()
    levels = result.levels
    paths = [_latency_cdf(plt, levels, out_dir / "latency_cdf.png"),
             _throughput(plt, levels, out_dir / "throughput.png")]
    if any(lv.ab is not None for lv in levels):
        paths.append(_speedup(plt, levels, out_dir / "speedup.png"))
    acc = _acceptance(plt, levels, out_dir / "acceptance_per_position.png")
    if acc is not None:
        paths.append(acc)
    return paths
