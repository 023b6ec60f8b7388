"""What the load-time kernel check of int4/int8 weights costs (`int4_format.check_kernel`).

Every quantized layer multiplies a few unit vectors through its kernel at load and compares
them with the quantized values, so a device whose kernel reads the packing differently is
refused instead of serving wrong tokens. This times `LLMEngine.from_config` for the default
model with the check as shipped and with it replaced by a no-op, alternating, in one
process (the first load of each warms caches and is reported apart).

    python benchmarks/load_time.py [--weights int4] [--runs 4]
"""

from __future__ import annotations

import argparse
import statistics
import time

from mtpserve.decoding.model import int4_format
from mtpserve.decoding.config import EngineConfig
from mtpserve.decoding.engine.llm_engine import LLMEngine


def load_seconds(weights: str) -> float:
    start = time.perf_counter()
    engine = LLMEngine.from_config(EngineConfig(weights=weights))
    seconds = time.perf_counter() - start
    del engine
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default="int4", choices=["int4", "int8"])
    ap.add_argument("--runs", type=int, default=4)
    a = ap.parse_args()
    shipped = int4_format.check_kernel
    times: dict[str, list[float]] = {"with check": [], "without": []}
    first = {name: 0.0 for name in times}
    for run in range(a.runs + 1):
        for name in times:
            int4_format.check_kernel = shipped if name == "with check" else (lambda *args: None)
            seconds = load_seconds(a.weights)
            if run == 0:
                first[name] = seconds
            else:
                times[name].append(seconds)
    int4_format.check_kernel = shipped
    print(f"LLMEngine.from_config, default model, --weights {a.weights}, {a.runs} runs each")
    print("| kernel check | first load s | median s | min s | max s |")
    print("|---|---|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {first[name]:.2f} | {statistics.median(ts):.2f} | {min(ts):.2f} "
              f"| {max(ts):.2f} |")
    cost = statistics.median(times["with check"]) - statistics.median(times["without"])
    print(f"check costs {cost:+.2f} s per load (median difference)")


if __name__ == "__main__":
    main()
