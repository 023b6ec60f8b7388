"""Where inside a closed-loop chunk an A/B arm loses time: per level, arm and chunk, the
chunk's wall time and, in 5-second bins from the chunk's start, the median gap between the
streamed events of the chunk's last request to finish (about one engine step each) and how
many of the chunk's requests were still unfinished at that time.

    python benchmarks/chunk_steps.py OUT/mtpserve/results.json [--level c=32] [--chunks 4]

Reads a results.json that `mtpserve-loadtest --ab --ab-schedule alternating` wrote; the
requests of each arm are split into `--chunks` groups in start order (the schedule's
blocks). Used for the session 6 diagnosis in docs/experiments.md.
"""

from __future__ import annotations

import argparse
import json
import statistics


def chunks_of(requests: list[dict], arm: str, n: int) -> list[list[dict]]:
    mine = sorted((r for r in requests if r["arm"] == arm and r["ok"]), key=lambda r: r["start_s"])
    size = max(1, len(mine) // n)
    return [mine[i * size:(i + 1) * size] for i in range(n) if mine[i * size:(i + 1) * size]]


def chunk_line(chunk: list[dict], bin_s: float) -> str:
    t0 = min(r["start_s"] for r in chunk)
    ends = [r["start_s"] + r["e2e_s"] - t0 for r in chunk]
    last = max(chunk, key=lambda r: r["start_s"] + r["e2e_s"])
    times = [last["start_s"] + o - t0 for o in last["event_offsets_s"]]
    gaps: dict[int, list[float]] = {}
    for a, b in zip(times, times[1:]):
        gaps.setdefault(int(b // bin_s), []).append(b - a)
    cells = [f"{int(k * bin_s)}s:{1000 * statistics.median(v):.0f}ms/{sum(e > k * bin_s for e in ends)}"
             for k, v in sorted(gaps.items())]
    tokens = sum(r["output_tokens"] for r in chunk)
    return f"wall {max(ends):5.1f}s tokens {tokens:5d} | " + " ".join(cells)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results")
    ap.add_argument("--level", default=None, help="e.g. c=32 (default: every level)")
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--bin", type=float, default=5.0, help="seconds per bin")
    a = ap.parse_args()
    with open(a.results, encoding="utf-8") as f:
        requests = json.load(f)["requests"]
    levels = sorted({r["level"] for r in requests}, key=lambda s: int(s.split("=")[1]))
    for level in levels if a.level is None else [a.level]:
        rs = [r for r in requests if r["level"] == level]
        print(f"{level}  (bin: median event gap of the chunk's last request / requests unfinished)")
        for arm in sorted({r["arm"] for r in rs}):
            for i, chunk in enumerate(chunks_of(rs, arm, a.chunks)):
                print(f"  {arm} chunk {i}: {chunk_line(chunk, a.bin)}")


if __name__ == "__main__":
    main()
