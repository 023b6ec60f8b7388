"""The row attention kernel of this tree against the same kernel at another git revision,
in ONE process, called alternately (this VM's speed moves by 20-50% between minutes):
per layer call, the layouts of row_attention.py's micro table (one decode row at several
contexts, a 16-node tree at context 300, 16 sequences x 1 row), fp16 and fp32 caches.
Both kernels get the same inputs and must give the same bits (the table says).

--step: instead, what a compiled step's attention costs: the layout installed once
(set_step_rows), then step_attention for each of 30 layers (write the step's K/V, attend,
cast), bf16 activations, an fp16 cache; outputs and cache bytes compared.

    flock /tmp/mtpserve-cpu.lock .venv/bin/python benchmarks/row_attention_ab.py [--rev HEAD] [--rounds 15] [--step]
"""

from __future__ import annotations

import argparse
import functools
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


def step_calls(ops, kv: torch.Tensor, layers: int, slots: torch.Tensor, store: torch.Tensor,
               layout: tuple, qkv: tuple) -> list[torch.Tensor]:
    """One compiled step's attention: the layout installed, then every layer's call."""
    ops.set_step_rows(kv, slots, store, *layout, slots.numel())
    try:
        return [ops.step_attention(*qkv, i, SCALE) for i in range(layers)]
    finally:
        ops.clear_step_rows()


def step_table(base_ops, rounds: int, calls: int) -> None:
    """30 layers of step_attention per call of the timed function, per case."""
    this_ops = torch.ops.mtpserve_rows
    layers, slot_len = 30, 1024
    print(f"| one step, {layers} layers | {'rows'} | base us | this tree us | ratio | bits |")
    print("|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(2)
    for name, items in micro_cases(torch.Generator().manual_seed(1)):
        items = [(s, min(c, 1000), m) for s, c, m in items]  # within this cache
        meta = layout_meta(items)
        T = sum(m.shape[0] if m is not None else 1 for _, _, m in items)
        slots = torch.tensor([s for s, _, m in items for _ in range(1 if m is None else m.shape[0])])
        store = torch.tensor([c + i for _, c, m in items for i in range(1 if m is None else m.shape[0])])
        layout = ra.row_layout(meta, T)
        q = torch.randn(T, HQ, D, generator=g).bfloat16()
        k, v = (torch.randn(T, HKV, D, generator=g).bfloat16() for _ in range(2))
        caches = {w: torch.randn(layers, 2, 16, HKV, slot_len, D, generator=torch.Generator()
                                 .manual_seed(3)).half() for w in ("base", "this")}

        step = functools.partial(step_calls, layers=layers, slots=slots, store=store,
                                 layout=layout, qkv=(q, k, v))
        runs = {"base": functools.partial(step, base_ops, caches["base"]),
                "this": functools.partial(step, this_ops, caches["this"])}
        outs = {w: fn() for w, fn in runs.items()}
        same = (all(torch.equal(a, b) for a, b in zip(outs["base"], outs["this"]))
                and torch.equal(caches["base"], caches["this"]))
        best = {w: float("inf") for w in runs}
        for r in range(rounds):
            for w in (("base", "this") if r % 2 else ("this", "base")):
                best[w] = min(best[w], best_us(runs[w], calls))
        print(f"| {name} | {T} | {best['base']:.1f} | {best['this']:.1f} | "
              f"{best['this'] / best['base']:.2f} | {'same' if same else 'DIFFER'} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", default="HEAD", help="git revision of the baseline kernel")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=30, help="calls per timing (a mean)")
    ap.add_argument("--step", action="store_true", help="a compiled step's 30 layer calls")
    args = ap.parse_args()
    if not ra.available():
        raise SystemExit("the row attention kernel does not build here")
    base_ops = build_at_revision(args.rev, SOURCE, "mtpserve_rows")
    if args.step:
        print(f"threads {torch.get_num_threads()}; baseline {args.rev}, min over {args.rounds} "
              f"rounds of {args.calls // 3 or 1} steps\n")
        step_table(base_ops, args.rounds, args.calls // 3 or 1)
        return
    base = base_ops.row_attention
    this = torch.ops.mtpserve_rows.row_attention
    g = torch.Generator().manual_seed(0)
    print(f"threads {torch.get_num_threads()}, kernel path: "
          f"{ra.kernel_path()}; baseline {args.rev}, min over "
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
