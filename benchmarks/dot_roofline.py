"""How close the int4 kernel's extra rows are to this CPU's integer dot-product peak, and
what that peak allows the verify curve to be: a roofline for #23's ratio targets.

Every row of a pass costs its multiply-adds: the trunk's 30 layers hold 106M weights, so
one more row (a draft token in a verify pass, a sequence in a decode batch) is 106M
products however the kernel is written. With int16 activations (`vnni16`, the default:
exact dots, greedy output equal to dense fp32) a 512-bit vpdpwssd does 32 of them, int8
activations (vpdpbusd, `vnni`) 64. This script measures, on this CPU:

1. the peak rate of those instructions (a C loop of independent dot chains, built with
   the system C compiler, one copy per core run at the same time, max of the rounds);
2. the int4 kernel's pass over the trunk's 120 projections (random weights, 30 layers,
   int16 activations) at 1..R rows, min of the rounds, interleaved with (1);
3. per extra row: the kernel's marginal cost against the instruction floor, and the
   verify ratios cost(k)/cost(1) that floor allows for a step of --step-ms at one row.

    flock /tmp/mtpserve-cpu.lock .venv/bin/python benchmarks/dot_roofline.py [--step-ms 5.4]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from int4_kernel_ab import LAYERS, SHAPES, trunk_layers
from mtpserve.decoding.model import int4_vnni

TRUNK_MACS = LAYERS * sum(n * k for n, k in SHAPES)  # products per row, all layers

# One instruction kind per mode, 12 independent chains (enough for its latency); prints
# instructions per second.
PEAK_C = r"""
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t);
                          return t.tv_sec + t.tv_nsec * 1e-9; }
/* 12 named accumulators (an array would live in memory at -O2) */
#define CHAINS(OP) a0 = OP(a0, w, x); a1 = OP(a1, w, x); a2 = OP(a2, w, x); \
  a3 = OP(a3, w, x); a4 = OP(a4, w, x); a5 = OP(a5, w, x); a6 = OP(a6, w, x); \
  a7 = OP(a7, w, x); a8 = OP(a8, w, x); a9 = OP(a9, w, x); a10 = OP(a10, w, x); \
  a11 = OP(a11, w, x);
#define LOOP(OP) for (long j = 0; j < n / 12; j++) { CHAINS(OP) \
  __asm__ volatile("" : "+v"(w), "+v"(x)); }  /* keep the loop from folding */
int main(int argc, char** argv) {
  int mode = atoi(argv[1]); long n = atol(argv[2]);
  __m512i w = _mm512_set1_epi16(3), x = _mm512_set1_epi16(5);
  /* distinct starts: equal chains would be computed once */
  __m512i a0 = _mm512_set1_epi32(argc), a1 = _mm512_set1_epi32(argc + 1),
          a2 = _mm512_set1_epi32(argc + 2), a3 = _mm512_set1_epi32(argc + 3),
          a4 = _mm512_set1_epi32(argc + 4), a5 = _mm512_set1_epi32(argc + 5),
          a6 = _mm512_set1_epi32(argc + 6), a7 = _mm512_set1_epi32(argc + 7),
          a8 = _mm512_set1_epi32(argc + 8), a9 = _mm512_set1_epi32(argc + 9),
          a10 = _mm512_set1_epi32(argc + 10), a11 = _mm512_set1_epi32(argc + 11);
  double t = now();
  if (mode == 16) { LOOP(_mm512_dpwssd_epi32) } else { LOOP(_mm512_dpbusd_epi32) }
  double dt = now() - t;
  __m512i s = _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3)),
      _mm512_add_epi32(_mm512_add_epi32(a4, a5), _mm512_add_epi32(a6, a7)));
  s = _mm512_add_epi32(s, _mm512_add_epi32(_mm512_add_epi32(a8, a9), _mm512_add_epi32(a10, a11)));
  printf("%.6e %d\n", n / dt, _mm512_reduce_add_epi32(s) & 1);
  return 0;
}
"""
PRODUCTS = {16: 32, 8: 64}  # per 512-bit instruction: vpdpwssd (s16), vpdpbusd (u8 x s8)


def build_peak(workdir: Path) -> Path | None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return None
    src, exe = workdir / "peak.c", workdir / "peak"
    src.write_text(PEAK_C)
    flags = ["-O2", "-mavx512f", "-mavx512bw", "-mavx512vnni"]
    subprocess.run([cc, *flags, str(src), "-o", str(exe)], check=True)
    return exe


def peak_rate(exe: Path, bits: int, cores: int, instructions: int = 200_000_000) -> float:
    """Instructions per second over `cores` copies running at once (sum of the copies)."""
    procs = [subprocess.Popen([str(exe), str(bits), str(instructions)], stdout=subprocess.PIPE,
                              text=True) for _ in range(cores)]
    return sum(float(p.communicate()[0].split()[0]) for p in procs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,2,4,8,16,32")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--step-ms", type=float, default=5.4,
                    help="the engine's whole verify step at k=1 (bench's verify curve)")
    args = ap.parse_args()
    if int4_vnni.isa() != 2:
        raise SystemExit("needs AVX512-VNNI (the int4 kernel's AVX-512 path)")
    cores = torch.get_num_threads()
    rows = [int(r) for r in args.rows.split(",")]
    layers = trunk_layers("vnni16")
    g = torch.Generator().manual_seed(1)
    xs = {m: {k: torch.randn(m, k, generator=g) for _, k in SHAPES} for m in rows}
    mm16 = torch.ops.mtpserve_int4.mm16
    best = {m: float("inf") for m in rows}
    rate = {16: 0.0, 8: 0.0}
    for m in rows:  # untimed: first calls fault the weights in
        for p, n, k in layers:
            mm16(xs[m][k], p, n)
    with tempfile.TemporaryDirectory() as tmp:
        exe = build_peak(Path(tmp))
        if exe is None:
            raise SystemExit("no C compiler (cc/gcc) to build the peak loop")
        for _ in range(args.rounds):
            for bits, best_rate in rate.items():
                rate[bits] = max(best_rate, peak_rate(exe, bits, cores))
            for m in rows:
                t0 = time.perf_counter()
                for p, n, k in layers:
                    mm16(xs[m][k], p, n)
                best[m] = min(best[m], time.perf_counter() - t0)
    macs16 = rate[16] * PRODUCTS[16]
    macs8 = rate[8] * PRODUCTS[8]
    floor16 = 1e3 * TRUNK_MACS / macs16  # ms per row, int16 activations
    floor8 = 1e3 * TRUNK_MACS / macs8
    print(f"{cores} cores; peak over {cores} copies: vpdpwssd {rate[16] / 1e9:.2f} G/s "
          f"({macs16 / 1e9:.0f} GMAC/s), vpdpbusd {rate[8] / 1e9:.2f} G/s ({macs8 / 1e9:.0f} "
          f"GMAC/s); trunk {TRUNK_MACS / 1e6:.1f}M products a row: instruction floor "
          f"{floor16:.2f} ms a row (int16), {floor8:.2f} (int8)\n")
    print("| rows | kernel pass ms | ms per row beyond the first | floor / that (int16) |")
    print("|---|---|---|---|")
    for m in rows:
        extra = (best[m] - best[rows[0]]) * 1e3 / (m - rows[0]) if m > rows[0] else None
        print(f"| {m} | {1e3 * best[m]:.2f} | {'-' if extra is None else f'{extra:.2f}'} | "
              f"{'-' if extra is None else f'{floor16 / extra:.0%}'} |")
    print(f"\nVerify ratios the floor allows for a {args.step_ms} ms step at k=1 (only the "
          "trunk's products added per row; the unembedding, attention and norms add more):\n")
    print("| k | target | int16 floor | int8 floor |")
    print("|---|---|---|---|")
    for k, target in ((4, 1.2), (8, 1.4), (16, 2.0)):
        r16 = 1 + (k - 1) * floor16 / args.step_ms
        r8 = 1 + (k - 1) * floor8 / args.step_ms
        print(f"| {k} | {target} | {r16:.2f} | {r8:.2f} |")


if __name__ == "__main__":
    main()
