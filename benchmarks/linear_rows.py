"""Cost of the trunk's projections by rows per pass, per weight format (the shape of the
verify curve): all 30 layers' q/k/v, o, gate/up and down projections of SmolLM2-135M with
random weights, int4 (PyTorch's CPU kernel, bf16 inputs), bf16 and fp32 dense, each dense
one as F.linear over [out, in] and in oneDNN's packed layout (what the engine stores on
CPU), fp32 also as x @ W^T over [in, out] (the engine's layout before session 8). Prints
a table of median milliseconds.

    python benchmarks/linear_rows.py [--threads 2] [--runs 15] [--rows 1,2,4,8,16,32,64]
        [--formats int4,bf16,bf16 pk,fp32,fp32 [in,out],fp32 pk]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from mtpserve.decoding.model.linear import Linear, onednn_linear, pack_for_onednn

SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576)]  # (in, out): qkv, o, gate_up, down
LAYERS = 30
FORMATS = ("int4", "bf16", "bf16 pk", "fp32", "fp32 [in,out]", "fp32 pk")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--rows", default="1,2,4,8,16,32,64", help="comma list of rows per pass")
    ap.add_argument("--formats", default=",".join(FORMATS), help="comma list, of: " + ", ".join(FORMATS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense = [[torch.randn(o, i) * 0.02 for i, o in SHAPES] for _ in range(LAYERS)]
    bf16 = [[w.to(torch.bfloat16) for w in row] for row in dense]
    fp32_t = [[w.t().contiguous() for w in row] for row in dense]
    packed = {"fp32 pk": [[pack_for_onednn(w) for w in row] for row in dense],
              "bf16 pk": [[pack_for_onednn(w) for w in row] for row in bf16]}
    if packed["fp32 pk"][0][0] is None:
        raise SystemExit("this PyTorch build has no oneDNN packed linear")
    int4 = []
    for row in dense:
        lins = []
        for w in row:
            lin = Linear(w.shape[1], w.shape[0], bias=False)
            lin.set_weight(w)
            lin.quantize_int4()
            lins.append(lin)
        int4.append(lins)

    def run(rows: int, fmt: str) -> float:
        xs = {i: torch.randn(rows, i) for i, _ in SHAPES}
        times = []
        for r in range(args.runs + 3):
            t0 = time.perf_counter()
            for layer in range(LAYERS):
                for j, (i, _) in enumerate(SHAPES):
                    if fmt == "int4":
                        int4[layer][j](xs[i])
                    elif fmt == "bf16":
                        F.linear(xs[i].to(torch.bfloat16), bf16[layer][j]).float()
                    elif fmt == "bf16 pk":
                        onednn_linear(xs[i].to(torch.bfloat16), packed[fmt][layer][j]).float()
                    elif fmt == "fp32 [in,out]":
                        torch.matmul(xs[i], fp32_t[layer][j])
                    elif fmt == "fp32 pk":
                        onednn_linear(xs[i], packed[fmt][layer][j])
                    else:
                        F.linear(xs[i], dense[layer][j])
            if r >= 3:
                times.append(time.perf_counter() - t0)
        return 1000 * statistics.median(times)

    print(f"ms for all {LAYERS} layers' projections (median of {args.runs}), {args.threads} threads")
    fmts = [f for f in FORMATS if f in args.formats.split(",")]
    print(f"{'rows':>4} " + " ".join(f"{f:>13}" for f in fmts))
    with torch.inference_mode():
        for rows in (int(r) for r in args.rows.split(",")):
            print(f"{rows:>4} " + " ".join(f"{run(rows, f):13.1f}" for f in fmts), flush=True)


if __name__ == "__main__":
    main()
