"""The int4 kernel of this tree against the same kernel at another git revision, in ONE
process, interleaved call by call: what a kernel change is worth on a VM whose speed moves
by 20-50% between minutes (two processes timed one after the other cannot resolve 10%).

The baseline's source (`git show REV:decoding/model/kernels/int4_vnni.cpp`) is built under
another op namespace (mtpserve_int4_base) beside this tree's kernel; both get the same
packed weights (the layout must not have changed) and the same inputs, and must give the
same bits (the script says where they differ). Time: a pass over every projection of the
30-layer trunk (q/k/v, o, gate/up, down: weights streamed from memory as in the model), min
over rounds, the two kernels alternating within each round. Prints a markdown table.

--engine: the same for the whole step instead: two engines with the default settings
(compiled unless --compile off), the first built and warmed up with the baseline kernel
patched in, and the verify curve (one forward + logits over k new tokens at context 300,
engine/step_costs.py) of each, alternating, min over rounds.

    flock /tmp/cpu.lock python benchmarks/int4_kernel_ab.py [--rev HEAD~1]
        [--rows 1,2,4,8,12,16,32,64,256] [--act-bits 16] [--rounds 15]
        [--engine [--ks 1,2,4,8,12,16] [--compile on]]
"""

from __future__ import annotations

import argparse
import time

import torch
from kernel_revision import build_at_revision
from mtpserve.decoding.model import int4_vnni
from mtpserve.decoding.model.linear import Linear

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # N x K: qkv, o, gate_up, down
LAYERS = 30
SOURCE = "decoding/model/kernels/int4_vnni.cpp"


def baseline_op(rev: str, act_bits: int):
    """The kernel at `rev`, built under the op namespace mtpserve_int4_base."""
    ops = build_at_revision(rev, SOURCE, "mtpserve_int4")
    for op in ("mm", "mm16"):  # shapes for torch.compile: int4_vnni's own fake kernel
        torch.library.register_fake(f"mtpserve_int4_base::{op}")(int4_vnni._mm_fake)
    return ops.mm16 if act_bits == 16 else ops.mm


def trunk_layers(kernel: str) -> list[tuple[torch.Tensor, int, int]]:
    """The trunk's 120 projections (30 layers of SHAPES), random weights packed for the
    VNNI kernel (`kernel`: vnni16 or vnni): (packed, N, K) each."""
    g = torch.Generator().manual_seed(0)
    layers = []
    for _ in range(LAYERS):
        for n, k in SHAPES:
            lin = Linear(k, n, bias=False)
            lin.set_weight(torch.randn(n, k, generator=g) * 0.02)
            lin.quantize_int4(kernel=kernel)
            layers.append((lin.int4_vnni, n, k))
    return layers


def engine_curves(base, ks: list[int], rounds: int, compile_mode: str) -> None:
    """The verify curve of two engines, the first built with `base` as its int4 kernel."""
    from mtpserve.decoding.config import EngineConfig
    from mtpserve.decoding.engine.llm_engine import LLMEngine
    from mtpserve.decoding.engine.step_costs import verify_times

    this_mm = int4_vnni.mm

    def base_mm(x, packed, n, act_bits=8):
        return base(x, packed, n) if act_bits == 16 else this_mm(x, packed, n, act_bits)

    engines = {}
    for name, mm in (("base", base_mm), ("this", this_mm)):
        int4_vnni.mm = mm  # what Linear calls, traced into the compiled graph at warm-up
        engines[name] = LLMEngine.from_config(EngineConfig(compile=compile_mode))
    int4_vnni.mm = this_mm
    filler = engines["this"].tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 20)
    best = {name: {k: float("inf") for k in ks} for name in engines}
    for r in range(rounds):
        for name in (("base", "this") if r % 2 else ("this", "base")):
            for row in verify_times(engines[name], filler, 300, ks, 5):
                best[name][row["k"]] = min(best[name][row["k"]], row["ms_min"])
    print("| kernel | " + " | ".join(f"k={k} ms (/k=1)" for k in ks) + " |")
    print("|---|" + "---|" * len(ks))
    for name in engines:
        print(f"| {name} | " + " | ".join(
            f"{best[name][k]:.2f} ({best[name][k] / best[name][ks[0]]:.2f})" for k in ks) + " |")
    print("| this / base | " + " | ".join(f"{best['this'][k] / best['base'][k]:.2f}"
                                          for k in ks) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", default="HEAD", help="git revision of the baseline kernel")
    ap.add_argument("--rows", default="1,2,4,8,12,16,32,64,256")
    ap.add_argument("--act-bits", type=int, choices=(8, 16), default=16)
    ap.add_argument("--rounds", type=int, default=15, help="rounds up to 64 rows (4 beyond)")
    ap.add_argument("--engine", action="store_true", help="whole-step verify curves instead")
    ap.add_argument("--ks", default="1,2,4,8,12,16")
    ap.add_argument("--compile", default="on", choices=("on", "off"))
    args = ap.parse_args()
    if not int4_vnni.available():
        raise SystemExit("the int4 VNNI kernel does not run here")
    base = baseline_op(args.rev, args.act_bits)
    if args.engine:
        engine_curves(base, [int(k) for k in args.ks.split(",")], args.rounds, args.compile)
        return
    ops = torch.ops.mtpserve_int4
    this = ops.mm16 if args.act_bits == 16 else ops.mm
    layers = trunk_layers("vnni16" if args.act_bits == 16 else "vnni")
    g = torch.Generator().manual_seed(0)
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
