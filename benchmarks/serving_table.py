"""Side-by-side tables from the mtpserve-loadtest runs under one folder (benchmarks/serving.sh).

    python benchmarks/serving_table.py benchmarks/results/serving-<host>-<date>

Reads every <run>/results.json and prints markdown: output tokens/s per run and arm at
each load level, median TPOT, the A/B speedups with their bootstrap intervals and text
checks, and each peer's speculation over its own plain run.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

# speculative run -> the plain run of the same engine it is compared with
PLAIN_OF = {"llamacpp-ngram": "llamacpp-plain", "vllm-ngram": "vllm-plain",
            "vllm-medusa": "vllm-plain"}


def load_runs(folder: Path) -> dict[str, dict[str, Any]]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(folder.glob("*/results.json"))}


def arm_label(run: str, arm: str, res: dict[str, Any]) -> str:
    """'mtpserve / A (speculation off)' for A/B runs, the run name otherwise."""
    arms = res["config"]["arms"]
    if len(arms) == 1:
        return run
    extra = next(a["extra_body"] for a in arms if a["name"] == arm)
    return f"{run} {arm} `{json.dumps(extra, separators=(',', ':'))}`"


def per_level(res: dict[str, Any], arm: str, key: str, sub: str | None = None
              ) -> dict[str, float | None]:
    out = {}
    for lv in res["levels"]:
        a = lv["arms"].get(arm)
        v = None if a is None else a.get(key)
        if sub is not None and isinstance(v, dict):
            v = v.get(sub)
        out[lv["level"]["label"]] = v
    return out


def fmt(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows), ""]


def main(folder: Path) -> str:
    runs = load_runs(folder)
    if not runs:
        return f"no */results.json under {folder}"
    levels: list[str] = []
    for res in runs.values():
        for lv in res["levels"]:
            if lv["level"]["label"] not in levels:
                levels.append(lv["level"]["label"])
    tps_rows, tpot_rows, tps = [], [], {}
    for run, res in runs.items():
        for arm in (a["name"] for a in res["config"]["arms"]):
            label = arm_label(run, arm, res)
            t = per_level(res, arm, "output_throughput")
            tps[(run, arm)] = t
            tps_rows.append([label] + [fmt(t.get(lv)) for lv in levels])
            p = per_level(res, arm, "tpot_ms", "p50")
            tpot_rows.append([label] + [fmt(p.get(lv)) for lv in levels])
    lines = ["### Output tokens/s (all requests of the level / its wall time)", ""]
    lines += table(["run"] + levels, tps_rows)
    lines += ["### Median time per output token (ms)", ""]
    lines += table(["run"] + levels, tpot_rows)
    ab_rows = []
    for run, res in runs.items():
        for lv in res["levels"]:
            ab = lv.get("ab")
            if not ab:
                continue
            ci = ab.get("speedup_tps") or {}
            check = (f"{ab['identical']}/{ab['compared']} identical"
                     if ab["mismatch_check"] == "done" else ab["mismatch_check"])
            ties = [m["probe"] for m in ab["mismatches"] if m.get("probe")]
            if ties:
                near = sum(1 for p in ties if p.get("near_tie"))
                check += f"; {near}/{len(ties)} mismatches at near-ties"
            ab_rows.append([run, lv["level"]["label"], fmt(ab["tps_a"]), fmt(ab["tps_b"]),
                            f"{fmt(ci.get('point'), 2)} [{fmt(ci.get('lo'), 2)}, "
                            f"{fmt(ci.get('hi'), 2)}]", check])
    if ab_rows:
        lines += ["### A/B: arm B over arm A (per-request tok/s over paired prompts, 95% "
                  "bootstrap CI)", ""]
        lines += table(["run", "level", "tok/s A", "tok/s B", "speedup", "temperature-0 check"],
                       ab_rows)
    peer_rows = []
    for spec, plain in PLAIN_OF.items():
        if (spec, "main") in tps and (plain, "main") in tps:
            a, b = tps[(plain, "main")], tps[(spec, "main")]
            peer_rows.append([f"{spec} / {plain}"] + [
                fmt(b[lv] / a[lv], 2) if a.get(lv) and b.get(lv) else "n/a" for lv in levels])
    if peer_rows:
        lines += ["### Peers: speculation over the same engine's plain run (level tok/s ratio)", ""]
        lines += table(["runs"] + levels, peer_rows)
    return "\n".join(lines)


if __name__ == "__main__":
    print(main(Path(sys.argv[1] if len(sys.argv) > 1 else ".")))
