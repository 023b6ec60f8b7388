"""The row attention kernel of this tree against the same kernel at another git revision,
in ONE process, called alternately (this VM's speed moves by 20-50% between minutes):
per layer call, the layouts of row_attention.py's micro table (one decode row at several
contexts, a 16-node tree at context 300, 16 sequences x 1 row), fp16 and fp32 caches.
Both kernels get the same inputs and must give the same bits (the table says).

    flock /tmp/mtpserve-cpu.lock .venv/bin/python benchmarks/row_attention_ab.py [--rev HEAD] [--rounds 15]
"""

from __future__ import annotations

import argparse
import time

import torch
from kernel_revision import build_at_revision
from mtpserve.decoding.model import row_attention as ra
from row_attention import HKV, HQ, SCALE, D, layout_meta, micro_cases

SOURCE = "decoding/model/kernels/row_attention.cpp"


def best_us(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return 1e6 * (time.perf_counter() - t0) / calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", default="HEAD", help="git revision of the baseline kernel")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=30, help="calls per timing (a mean)")
    args = ap.parse_args()
    if not ra.available():
        raise SystemExit("the row attention kernel does not build here")
    base = build_at_revision(args.rev, SOURCE, "mtpserve_rows").row_attention
    this = torch.ops.mtpserve_rows.row_attention
    g = torch.Generator().manual_seed(0)
    print(f"threads {torch.get_num_threads()}, kernel path: "
          f"{'AVX-512' if ra.vector_path() else 'generic C++'}; baseline {args.rev}, min over "
          f"{args.rounds} rounds of {args.calls} calls\n")
    print(f"| per layer call | cache | {args.rev} us | this tree us | ratio | bits |")
    print("|---|---|---|---|---|---|")
    for dtype in (torch.float16, torch.float32):
        layer = torch.randn(2, 16, HKV, 2100, D, generator=g).to(dtype)
        for name, items in micro_cases(torch.Generator().manual_seed(1)):
            meta = layout_meta(items)
            T = sum(m.shape[0] if m is not None else 1 for _, _, m in items)
            q = torch.randn(T, HQ, D, generator=g)
            layout = ra.row_layout(meta, T)
            args_ = (q, layer, *layout, SCALE)
            runs = {"base": lambda a=args_: base(*a), "this": lambda a=args_: this(*a)}
            same = torch.equal(runs["base"](), runs["this"]())
            best = {k: float("inf") for k in runs}
            for r in range(args.rounds):
                for k in (("base", "this") if r % 2 else ("this", "base")):
                    best[k] = min(best[k], best_us(runs[k], args.calls))
            print(f"| {name} | {str(dtype).removeprefix('torch.')} | {best['base']:.1f} | "
                  f"{best['this']:.1f} | {best['this'] / best['base']:.2f} | "
                  f"{'same' if same else 'DIFFER'} |", flush=True)


if __name__ == "__main__":
    main()
