"""The int4 kernel of this tree against the same kernel at another git revision, in ONE
process, interleaved call by call: what a kernel change is worth on a VM whose speed moves
by 20-50% between minutes (two processes timed one after the other cannot resolve 10%).

The baseline's source (`git show REV:decoding/model/kernels/int4_vnni.cpp`) is built under
another op namespace (mtpserve_int4_base) beside this tree's kernel; both get the same
packed weights (the layout must not have changed) and the same inputs, and must give the
same bits (the script says where they differ). Time: a pass over every projection of the
30-layer trunk (q/k/v, o, gate/up, down: weights streamed from memory as in the model), min
over rounds, the two kernels alternating within each round. Prints a markdown table.

    flock /tmp/cpu.lock python benchmarks/int4_kernel_ab.py [--rev HEAD~1]
        [--rows 1,2,4,8,12,16,32,64,256] [--act-bits 16] [--rounds 15]
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from mtpserve.decoding.model import int4_vnni
from mtpserve.decoding.model.kernel_build import load_kernel
from mtpserve.decoding.model.linear import Linear

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # N x K: qkv, o, gate_up, down
LAYERS = 30
SOURCE = "decoding/model/kernels/int4_vnni.cpp"


def baseline_op(rev: str, act_bits: int):
    """The kernel at `rev`, built under the op namespace mtpserve_int4_base."""
    root = Path(__file__).resolve().parent.parent
    text = subprocess.run(["git", "-C", str(root), "show", f"{rev}:{SOURCE}"], check=True,
                          capture_output=True, text=True).stdout
    src = Path(tempfile.mkdtemp()) / "int4_vnni_base.cpp"
    src.write_text(text.replace("mtpserve_int4", "mtpserve_int4_base"))
    load_kernel(src)
    ops = torch.ops.mtpserve_int4_base
    return ops.mm16 if act_bits == 16 else ops.mm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", default="HEAD", help="git revision of the baseline kernel")
    ap.add_argument("--rows", default="1,2,4,8,12,16,32,64,256")
    ap.add_argument("--act-bits", type=int, choices=(8, 16), default=16)
    ap.add_argument("--rounds", type=int, default=15, help="rounds up to 64 rows (4 beyond)")
    args = ap.parse_args()
    if not int4_vnni.available():
        raise SystemExit("the int4 VNNI kernel does not run here")
    base = baseline_op(args.rev, args.act_bits)
    ops = torch.ops.mtpserve_int4
    this = ops.mm16 if args.act_bits == 16 else ops.mm
    g = torch.Generator().manual_seed(0)
    layers = []
    for _ in range(LAYERS):
        for n, k in SHAPES:
            lin = Linear(k, n, bias=False)
            lin.set_weight(torch.randn(n, k, generator=g) * 0.02)
            lin.quantize_int4(kernel="vnni16" if args.act_bits == 16 else "vnni")
            layers.append((lin.int4_vnni, n, k))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, int4 kernel path "
          f"{int4_vnni.ISA_NAMES.get(int4_vnni.isa(), 'none')}, int{args.act_bits} "
          f"activations; baseline {args.rev}\n")
    print(f"| rows | {args.rev} ms | this tree ms | ratio | bits |")
    print("|---|---|---|---|---|")
    for m in (int(r) for r in args.rows.split(",")):
        xs = {k: torch.randn(m, k, generator=g) for _, _, k in layers[:len(SHAPES)]}
        same = all(torch.equal(base(xs[k], p, n), this(xs[k], p, n)) for p, n, k in layers)
        best = {"base": float("inf"), "this": float("inf")}
        for r in range(args.rounds if m <= 64 else 4):
            order = (("base", base), ("this", this)) if r % 2 else (("this", this), ("base", base))
            for name, op in order:
                t0 = time.perf_counter()
                for p, n, k in layers:
                    op(xs[k], p, n)
                best[name] = min(best[name], time.perf_counter() - t0)
        print(f"| {m} | {1e3 * best['base']:.2f} | {1e3 * best['this']:.2f} | "
              f"{best['this'] / best['base']:.2f} | {'same' if same else 'DIFFER'} |", flush=True)


if __name__ == "__main__":
    main()
