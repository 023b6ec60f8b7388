"""What oneDNN's per-shape primitive cache costs, and what bucketing row counts buys back.

oneDNN (and PyTorch's ideep layer over it) keeps one primitive per input shape, and each
holds memory. A server sees every prompt length, so its CPU passes through oneDNN (the
packed fp32/bf16 projections, the bf16 copies of int4 weights for passes of 32+ rows)
would run at every row count. Per path, with this model's four projection shapes, each
measurement in a fresh process (the cache is per process):

- RSS growth after one pass at every row count 1..--max-rows, raw and bucketed
  (`mtpserve.decoding.model.linear.bucket_rows`);
- the time of passes at --samples random row counts in 17..--max-rows after one warm-up
  round, raw and bucketed (the padding's cost), and raw with both caches capped at
  --capacity entries (ONEDNN_PRIMITIVE_CACHE_CAPACITY, LRU_CACHE_CAPACITY: the other
  way to bound memory, which re-creates primitives).

    python benchmarks/onednn_shapes.py [--max-rows 512] [--samples 40] [--runs 5] [--capacity 64]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from mtpserve.decoding.model.linear import _in_buckets, pack_for_onednn

SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576)]  # (in, out): qkv, o, gate_up, down
PATHS = {"fp32 packed": torch.float32, "bf16 packed": torch.bfloat16, "bf16 F.linear": torch.bfloat16}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def _weights(path: str) -> tuple[list[tuple[torch.Tensor, int]], torch.dtype]:
    dtype = PATHS[path]
    ws = [torch.randn(o, i).to(dtype) for i, o in SHAPES]
    if path.endswith("packed"):
        ws = [pack_for_onednn(w) for w in ws]
    return [(w, i) for w, (i, _) in zip(ws, SHAPES)], dtype


def measure(path: str, bucketed: bool, max_rows: int, samples: int, runs: int) -> dict:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    weights, dtype = _weights(path)
    raw = (lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
           ) if path.endswith("packed") else F.linear
    fn = (lambda x, w: _in_buckets(raw, x, w)) if bucketed else raw
    xs = {i: torch.randn(max_rows, i).to(dtype) for i, _ in SHAPES}
    rss0 = _rss_mib()
    for m in range(1, max_rows + 1):
        for w, i in weights:
            fn(xs[i][:m], w)
    grown = _rss_mib() - rss0
    rng = random.Random(0)
    ms = [rng.randint(17, max_rows) for _ in range(samples)]

    def timed() -> float:
        t0 = time.perf_counter()
        for m in ms:
            for w, i in weights:
                fn(xs[i][:m], w)
        return time.perf_counter() - t0

    timed()
    return {"rss_mib": grown, "ms": 1000 * statistics.median(timed() for _ in range(runs))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-rows", type=int, default=512)
    ap.add_argument("--samples", type=int, default=40)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--capacity", type=int, default=64)
    ap.add_argument("--one", nargs=2, metavar=("PATH", "BUCKETED"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(measure(a.one[0], a.one[1] == "1", a.max_rows, a.samples, a.runs)))
        return
    print(f"row counts 1..{a.max_rows}, 4 projection shapes; time: {a.samples} passes at random "
          f"row counts 17..{a.max_rows} after a warm-up round, median of {a.runs}; 2 threads")
    print(f"{'path':<15} {'RSS raw':>9} {'capped':>8} {'bucketed':>9} {'ms raw':>8} "
          f"{'capped':>8} {'bucketed':>9}")
    capped = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": str(a.capacity), "LRU_CACHE_CAPACITY": str(a.capacity)}
    for path in PATHS:
        res = []
        for bucketed, extra in (("0", {}), ("0", capped), ("1", {})):
            # a fresh process each: the caches are per process, their capacity read once
            out = subprocess.run([sys.executable, __file__, "--max-rows", str(a.max_rows),
                                  "--samples", str(a.samples), "--runs", str(a.runs),
                                  "--one", path, bucketed], env={**os.environ, **extra},
                                 check=True, capture_output=True, text=True).stdout
            res.append(json.loads(out.strip().splitlines()[-1]))
        r, c, b = res
        print(f"{path:<15} {r['rss_mib']:>8.0f}M {c['rss_mib']:>7.0f}M {b['rss_mib']:>8.0f}M "
              f"{r['ms']:>8.1f} {c['ms']:>8.1f} {b['ms']:>9.1f}")

if __name__ == "__main__":
    main()
