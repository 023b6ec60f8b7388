"""Engine start time and resident memory with and without the compiled trunk: what
`--compile on|auto` costs at startup. Run it twice with the same TORCHINDUCTOR_CACHE_DIR
(an empty folder first) for the cold and the warm (cached) start. Each compiled row also
gives where the compile went, by dynamo's own timers (`torch._dynamo.utils.compile_times`):
all of it, bytecode tracing, AOTAutograd (graph capture, then freezing: constant folding
over the real weights), inductor (its FX graph cache's lookup and load, or a full
codegen), guards.

    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python benchmarks/compile_start.py --compile off,on,on
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

ONE = """
import time, sys
t0 = time.perf_counter()
from mtpserve.decoding.config import EngineConfig, SpecConfig
from mtpserve.decoding.engine.llm_engine import LLMEngine
eng = LLMEngine.from_config(EngineConfig(spec=SpecConfig(mode="off"), compile=sys.argv[1]))
rss = int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
from torch._dynamo.utils import compile_times
names, secs = compile_times(repr="csv", aggregate=True)
t = dict(zip(names, map(float, secs)))
inductor = t.get("compile_fx_inner", 0)
phases = [t.get("_compile.compile_inner", 0), t.get("bytecode_tracing", 0),
          t.get("create_aot_dispatcher_function", 0) - inductor, inductor,
          t.get("build_guards", 0)]
print(" ".join(f"{x:.1f}" for x in phases))
print(f"{time.perf_counter() - t0:.1f} {rss:.0f} {eng.compiled is not None}")
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compile", default="off,on,on",
                    help="one fresh process per entry, in order (on twice: cold, then cached)")
    args = ap.parse_args()
    print(f"inductor cache: {os.environ.get('TORCHINDUCTOR_CACHE_DIR', '(default)')}")
    print("| --compile | start s (import + load + compile) | RSS MiB | compiled | compile s: "
          "all / tracing / AOT + freezing / inductor / guards |")
    print("|---|---|---|---|---|")
    for mode in args.compile.split(","):
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", ONE, mode], capture_output=True, text=True)
        if out.returncode != 0:
            print(f"| {mode} | failed: {out.stderr.strip().splitlines()[-1:]} | | |")
            continue
        *phases, secs, rss, compiled = out.stdout.split()[-8:]
        print(f"| {mode} | {secs} (process {time.perf_counter() - t0:.1f}) | {rss} | {compiled} "
              f"| {' / '.join(phases) if compiled == 'True' else '-'} |", flush=True)


if __name__ == "__main__":
    main()
