"""int4 kernels on CPU (--int4-kernel): PyTorch's (aten, bf16 activations) vs ours with
AVX512-VNNI (decoding/model/int4_vnni.py; vnni: int8 activations, vnni16: int16) vs
oneDNN's bf16 GEMM over the wide copy (what aten passes of WIDE_ROWS+ rows use), per
projection shape and row count; then the whole model with int4_kernel aten vs vnni16 vs
vnni in one process, interleaved: decode ms/step at batch 1 (and batch --batch), the verify
curve (one forward + logits over k rows), and greedy agreement of vnni16 with aten over
HumanEval prompts (at each first difference the top-2 logprob margin: near-ties, or a bug).

Kernel times: ms per call, min over repeats of a pass over --layers copies of the weight
(so weights stream from memory as in the model, not from cache), each kernel fed what the
engine feeds it (aten and oneDNN bf16, vnni fp32). Print markdown tables. Run alone:

    flock /tmp/cpu.lock python benchmarks/int4_kernels.py [--rows 1,2,4,8,12,16,32,64]
        [--layers 30] [--repeats 7] [--skip-model] [--skip-kernels] [--prompts 8] [--tokens 64]

--avx2 adds a table of vnni16's AVX2 path (what AVX2-only CPUs run; on an AVX-512 CPU the
code MTPSERVE_INT4_AVX2=1 selects) against its AVX-512 path and aten, both paths called
through the op mm16_isa, interleaved per row count (--avx2-rows, --avx2-shapes):

    MTPSERVE_INT4_AVX2=1 flock /tmp/cpu.lock python benchmarks/int4_kernels.py --avx2 \
        --skip-kernels --skip-model
"""

from __future__ import annotations

import argparse
import time

import torch

from mtpserve.decoding.config import EngineConfig, SamplingParams, SpecConfig
from mtpserve.decoding.engine.llm_engine import LLMEngine
from mtpserve.decoding.model import int4_vnni
from mtpserve.decoding.model.linear import WIDE_ROWS, Linear, onednn_linear
from mtpserve.decoding.tools.bench.prompts import encode_prompts, load_prompts
from mtpserve.decoding.tools.bench.verify_curve import verify_curve

from compiled_step import decode_ms_per_step  # this folder: the same timing loop

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # N x K: qkv, o, gate_up, down


def _time(fn, xs, repeats: int) -> float:
    """ms per call: min over repeats of one pass over every (layer, input)."""
    for f, x in zip(fn, xs):
        f(x)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for f, x in zip(fn, xs):
            f(x)
        best = min(best, (time.perf_counter() - t0) / len(fn))
    return 1000 * best


def kernel_table(rows: list[int], layers: int, repeats: int) -> None:
    print(f"\n## Kernels: ms per call (min of {repeats} passes over {layers} layers' weights)\n")
    print("| N x K | M | aten int4 | vnni (int8 act) | vnni16 (int16 act) | oneDNN bf16 (wide) "
          "| aten / vnni16 | vnni16 / vnni | bf16 / vnni16 |")
    print("|---|---|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for n, k in SHAPES:
        aten, vnni, vnni16 = [], [], []
        for _ in range(layers):
            w = torch.randn(n, k, generator=g) * 0.02
            for kernel, out in (("aten", aten), ("vnni", vnni), ("vnni16", vnni16)):
                lin = Linear(k, n, bias=False)
                lin.set_weight(w)
                lin.quantize_int4(wide_copy=kernel == "aten", kernel=kernel)
                out.append(lin)
        for m in rows:
            x = torch.randn(m, k, generator=g)
            xb = x.bfloat16()
            t_aten = _time([lin._int4_mm for lin in aten], [xb] * layers, repeats)
            t_vnni = _time([lin._int4_mm for lin in vnni], [x] * layers, repeats)
            t_16 = _time([lin._int4_mm for lin in vnni16], [x] * layers, repeats)
            t_bf16 = _time([(lambda v, w=lin.wide_weight: onednn_linear(v, w)) for lin in aten],
                           [xb] * layers, repeats)
            print(f"| {n}x{k} | {m} | {t_aten:.4f} | {t_vnni:.4f} | {t_16:.4f} | {t_bf16:.4f} | "
                  f"{t_aten / t_16:.2f}x | {t_16 / t_vnni:.2f}x | {t_bf16 / t_16:.2f}x |",
                  flush=True)


def avx2_table(shapes: list[tuple[int, int]], rows: list[int], layers: int, repeats: int
               ) -> None:
    """vnni16 on its AVX-512 path (isa 2) and its AVX2 path (isa 1; the same bits) vs aten,
    per shape and row count; the three interleaved, min over `repeats` rounds."""
    mm16_isa = torch.ops.mtpserve_int4.mm16_isa
    try:  # the CPU runs the AVX-512 path (even where MTPSERVE_INT4_AVX2 chose AVX2)
        mm16_isa(torch.zeros(1, 32), int4_vnni.pack(torch.zeros(16, 32, dtype=torch.int32),
                                                    torch.ones(16, 1), torch.zeros(16, 1)), 16, 2)
        avx512 = True
    except RuntimeError:  # an AVX2-only CPU: no AVX-512 column
        avx512 = False
    print(f"\n## vnni16: AVX2 path vs AVX-512 path vs aten, ms per call (min of {repeats} "
          f"interleaved rounds, each a pass over {layers} layers' weights)\n")
    print("| N x K | M | aten int4 | vnni16 AVX-512 | vnni16 AVX2 | AVX2 / AVX-512 "
          "| aten / AVX2 |")
    print("|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for n, k in shapes:
        aten, packed = [], []
        for _ in range(layers):
            w = torch.randn(n, k, generator=g) * 0.02
            for kernel in ("aten", "vnni16"):
                lin = Linear(k, n, bias=False)
                lin.set_weight(w)
                lin.quantize_int4(wide_copy=False, kernel=kernel)
                if kernel == "aten":
                    aten.append(lin)
                else:
                    packed.append(lin.int4_vnni)
        for m in rows:
            x = torch.randn(m, k, generator=g)
            xb = x.bfloat16()
            kernels = {"aten": ([lin._int4_mm for lin in aten], xb),
                       "avx2": ([lambda v, p=p, n=n: mm16_isa(v, p, n, 1) for p in packed], x)}
            if avx512:
                kernels["avx512"] = ([lambda v, p=p, n=n: mm16_isa(v, p, n, 2) for p in packed],
                                     x)
            best = {name: float("inf") for name in kernels}
            for _ in range(repeats):
                for name, (fns, v) in kernels.items():
                    best[name] = min(best[name], _time(fns, [v] * layers, 1))
            t512 = f"{best['avx512']:.4f}" if avx512 else "-"
            ratio = f"{best['avx2'] / best['avx512']:.2f}x" if avx512 else "-"
            print(f"| {n}x{k} | {m} | {best['aten']:.4f} | {t512} | {best['avx2']:.4f} | "
                  f"{ratio} | {best['aten'] / best['avx2']:.2f}x |", flush=True)


def greedy_with_margins(eng: LLMEngine, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """Plain greedy tokens, one row per step, and each step's top-2 logprob margin."""
    rid = f"g{time.monotonic_ns()}"
    eng.add_request(rid, prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True,
                                                speculate=False, logprobs=2))
    ids, margins = [], []
    while eng.has_unfinished():
        for out in eng.step():
            ids += out.new_token_ids
            for lp in out.logprobs or []:
                margins.append(lp.top[0][1] - lp.top[1][1])
    return ids, margins


def model_tables(args: argparse.Namespace) -> None:
    base = dict(spec=SpecConfig(mode="off"), max_num_seqs=max(args.batch, 1), max_model_len=512)
    # vnni and vnni16 run the kernel at every row count (no wide copy); aten switches to
    # the bf16 wide copy from WIDE_ROWS rows
    engines = {name: LLMEngine.from_config(EngineConfig(**base, int4_kernel=name))
               for name in ("aten", "vnni16", "vnni")}
    tok = engines["aten"].tokenizer
    _, raw = load_prompts(None, max(args.prompts, args.batch))
    prompts = encode_prompts(tok, raw)
    ks = [int(v) for v in args.ks.split(",")]
    res: dict[str, dict[str, float]] = {name: {} for name in engines}
    for _ in range(args.repeats_model):  # interleaved, min over repeats
        for name, eng in engines.items():
            for label, ps in (("b1", prompts[:1]), (f"b{args.batch}", prompts[:args.batch])):
                ms = decode_ms_per_step(eng, ps, args.decode_tokens)
                res[name][label] = min(res[name].get(label, float("inf")), ms)
            filler = [t for p in prompts for t in p]
            for row in verify_curve(eng, filler, args.context, ks, args.runs):
                key = f"k{row['k']}"
                res[name][key] = min(res[name].get(key, float("inf")), row["ms_min"])
    names = list(engines)
    print(f"\n## Whole model (int4 trunk, min of {args.repeats_model} interleaved repeats); "
          f"WIDE_ROWS = {WIDE_ROWS}: from {WIDE_ROWS} rows on aten uses the bf16 wide "
          "copy, vnni16 and vnni their kernel\n")
    print("| measure | " + " | ".join(names) + " | aten / vnni16 | aten / vnni |")
    print("|---|" + "---|" * (len(names) + 2))
    rows = [("b1", "decode batch 1, ms/step"), (f"b{args.batch}", f"decode batch {args.batch}, "
                                                                 "ms/step")]
    rows += [(f"k{k}", f"verify k={k} (ctx {args.context}), forward+logits ms") for k in ks]
    for key, label in rows:
        v = [res[name][key] for name in names]
        print(f"| {label} | " + " | ".join(f"{t:.1f}" for t in v)
              + f" | {v[0] / v[1]:.2f}x | {v[0] / v[2]:.2f}x |")

    print(f"\n## Greedy agreement, aten vs vnni16: {args.prompts} HumanEval prompts x "
          f"{args.tokens} tokens, batch 1, no speculation\n")
    same = 0
    print("| prompt | identical | first difference at | top-2 logprob margin there "
          "(aten / vnni16) |")
    print("|---|---|---|---|")
    for i, p in enumerate(prompts[:args.prompts]):
        a, ma = greedy_with_margins(engines["aten"], p, args.tokens)
        b, mb = greedy_with_margins(engines["vnni16"], p, args.tokens)
        d = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
        same += d is None
        where = "" if d is None else f"{d}"
        margin = "" if d is None else f"{ma[d]:.4f} / {mb[d]:.4f}"
        print(f"| {raw[i]['name']} | {'yes' if d is None else 'no'} | {where} | {margin} |")
    print(f"\n{same} of {args.prompts} outputs identical")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,2,4,8,12,16,32,64")
    ap.add_argument("--layers", type=int, default=30, help="weight copies per kernel pass")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--decode-tokens", type=int, default=32, help="decode steps per measurement")
    ap.add_argument("--repeats-model", type=int, default=3)
    ap.add_argument("--ks", default="1,2,4,8,12,16,32,64")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--runs", type=int, default=10, help="forwards per verify-curve point")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--avx2", action="store_true", help="also the AVX2-path table")
    ap.add_argument("--avx2-rows", default="1,4,8,16")
    ap.add_argument("--avx2-shapes", default="1536x576,576x1536", help="N x K, comma-separated")
    args = ap.parse_args()
    if not int4_vnni.available():
        raise SystemExit("the int4 VNNI kernel does not load here (see the warning)")
    if not int4_vnni.has_int8() and not (args.skip_kernels and args.skip_model):
        raise SystemExit("vnni (int8 activations) needs AVX512-VNNI, which this process lacks "
                         "(or MTPSERVE_INT4_AVX2 is set): run --avx2 --skip-kernels --skip-model")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, int4 kernel path: "
          f"{int4_vnni.ISA_NAMES[int4_vnni.isa()]}")
    if args.avx2:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.avx2_shapes.split(",")]
        avx2_table(shapes, [int(v) for v in args.avx2_rows.split(",")], args.layers,
                   args.repeats)
    if not args.skip_kernels:
        kernel_table([int(v) for v in args.rows.split(",")], args.layers, args.repeats)
    if not args.skip_model:
        model_tables(args)


if __name__ == "__main__":
    main()
