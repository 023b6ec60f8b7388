"""The Q8_0 unembedding kernel of this tree against the same kernel at another git revision,
in ONE process, alternating call by call (as int4_kernel_ab.py does for the int4 kernel):
the baseline's source is built under the op namespace mtpserve_q8_base; both get the same
packed 49152 x 576 weights (the model's unembedding shape, random codes) and the same rows,
and must give the same bits. Before every call a 200 MB buffer is written, so the weights
come from memory as they do in a step (the trunk's pass evicts them). Time: min over
rounds. Prints a markdown table.

    flock /tmp/cpu.lock python benchmarks/q8_kernel_ab.py [--rev HEAD] [--rows 1,2,4,16]
        [--rounds 21]
"""

from __future__ import annotations

import argparse
import time

import torch
from kernel_revision import build_at_revision
from mtpserve.decoding.model import q8_unembed

SOURCE = "decoding/model/kernels/q8_unembed.cpp"
N, K = 49152, 576


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", default="HEAD", help="git revision of the baseline kernel")
    ap.add_argument("--rows", default="1,2,4,16")
    ap.add_argument("--rounds", type=int, default=21)
    args = ap.parse_args()
    if not q8_unembed.available():
        raise SystemExit("the Q8_0 unembedding kernel does not run here")
    base = build_at_revision(args.rev, SOURCE, "mtpserve_q8").mm
    this = torch.ops.mtpserve_q8.mm
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    d = (torch.rand(N, K // 32, generator=g) * 0.01).half()
    packed = q8_unembed.pack(q, d)
    evict = torch.empty(50_000_000)  # 200 MB
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; baseline {args.rev}\n")
    print(f"| rows | {args.rev} ms | this tree ms | ratio | bits |")
    print("|---|---|---|---|---|")
    for m in (int(r) for r in args.rows.split(",")):
        x = torch.randn(m, K, generator=g)
        same = torch.equal(base(x, packed, N), this(x, packed, N))
        best = {"base": float("inf"), "this": float("inf")}
        for r in range(args.rounds):
            order = (("base", base), ("this", this)) if r % 2 else (("this", this), ("base", base))
            for name, op in order:
                evict.fill_(r)
                t0 = time.perf_counter()
                op(x, packed, N)
                best[name] = min(best[name], time.perf_counter() - t0)
        print(f"| {m} | {1e3 * best['base']:.3f} | {1e3 * best['this']:.3f} | "
              f"{best['this'] / best['base']:.2f} | {'same' if same else 'DIFFER'} |", flush=True)


if __name__ == "__main__":
    main()
