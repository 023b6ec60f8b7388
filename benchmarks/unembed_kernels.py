"""Candidate kernels for the unembedding, [rows, H] x [V, H]^T -> fp32 logits, on the
default model's own weight (SmolLM2-135M: the GGUF's Q8_0 token_embd, 49152 x 576) and
real final-normed hidden states (captured from greedy decoding with the int4 trunk).

Prints min milliseconds over --runs (after warm-up) per row count, the bytes each format
reads, and the max |logit error| against fp32 dense plus how many of the captured rows'
argmax moved. Kernels whose output is bf16 are listed for reference only (their logits are
rounded to bf16 steps: ~0.03-0.06 at this model's logit scale).

    python benchmarks/unembed_kernels.py [--threads 2] [--runs 40] [--rows 1,2,4,8,16,32]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from mtpserve.decoding.config import EngineConfig, SamplingParams, SpecConfig
from mtpserve.decoding.engine.llm_engine import LLMEngine
from mtpserve.decoding.model.linear import onednn_linear, pack_for_onednn

PROMPTS = ["def fibonacci(n):", "The capital of France is", "Write a haiku about the sea.",
           "import numpy as np\n", "Once upon a time", "SELECT name FROM users WHERE",
           "The three laws of thermodynamics are", "Q: What is 17 * 23?\nA:"]


def capture_hidden(max_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(unembedding weight [V, H] fp32, final-normed hidden rows [R, H] fp32)."""
    eng = LLMEngine.from_config(EngineConfig(max_num_seqs=8, max_model_len=512,
                                             spec=SpecConfig(mode="off")))
    seen: list[torch.Tensor] = []
    orig = eng.model.compute_logits

    def hook(h: torch.Tensor) -> torch.Tensor:
        seen.append(h.detach().float().clone())
        return orig(h)

    eng.model.compute_logits = hook
    ids = [eng.tokenizer.encode(p) for p in PROMPTS]
    eng.generate(ids, SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True))
    w = eng.model.unembed_weight().detach().float().clone()
    h = torch.cat(seen)[-max_rows:]
    return w, h


def quant_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: x ~= q * s[:, None]."""
    s = x.abs().amax(1).clamp(min=1e-30) / 127.0
    return torch.round(x / s[:, None]).to(torch.int8), s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--rows", default="1,2,4,8,16,32")
    ap.add_argument("--only", default="", help="comma list of kernel names (default all)")
    ap.add_argument("--cold", action="store_true",
                    help="sweep a 96 MB buffer before each timed call (L3 here is 32 MB: the "
                         "int8 weights fit in it, which the engine's step, reading the trunk's "
                         "weights in between, does not leave them)")
    args = ap.parse_args()
    torch.manual_seed(0)
    W, H = capture_hidden(256)
    torch.set_num_threads(args.threads)
    V, K = W.shape
    ref = F.linear(H.double(), W.double()).float()  # the exact logits, to judge every kernel

    # -- weight formats --------------------------------------------------------------
    fp32_pk = pack_for_onednn(W, batch_hint=16)
    Wb = W.to(torch.bfloat16)
    bf16_pk = pack_for_onednn(Wb)
    w_s = W.abs().amax(1).clamp(min=1e-30) / 127.0  # per-channel int8
    Wq = torch.round(W / w_s[:, None]).clamp(-127, 127).to(torch.int8)  # [V, K]
    Wq_kn = Wq.t().contiguous()  # [K, V] for _int_mm
    Wq_t = Wq.t()  # [K, V] view of [V, K]
    w_s_bf = w_s.to(torch.bfloat16)
    # Q8_0 exact: the file's 32-blocks (scale per block per row)
    d = W.view(V, K // 32, 32).abs().amax(-1).clamp(min=1e-30) / 127.0
    Q8 = torch.round(W.view(V, K // 32, 32) / d[..., None]).to(torch.int8)  # [V, 18, 32]
    Q8_blocks = [Q8[:, b].t().contiguous() for b in range(K // 32)]  # [32, V] each
    d_t = d.t().contiguous()  # [18, V]
    print(f"Q8_0 reconstruction max err {float((Q8.float() * d[..., None]).view(V, K).sub(W).abs().max()):.2e}"
          f"  per-channel int8 max weight err {float((Wq.float() * w_s[:, None]).sub(W).abs().max()):.2e}")
    prev_engine = torch.backends.quantized.engine
    dyn = {}
    for eng in ("fbgemm", "onednn"):
        try:
            torch.backends.quantized.engine = eng
            qw = torch.quantize_per_channel(W, w_s.double(), torch.zeros(V, dtype=torch.long), 0,
                                            torch.qint8)
            dyn[eng] = torch.ops.quantized.linear_prepack(qw, None)
        except RuntimeError as exc:
            print(f"{eng} dynamic linear unavailable: {exc}")
    torch.backends.quantized.engine = prev_engine
    try:
        fp16_w = torch.ops.quantized.linear_prepack_fp16(W, None)
    except RuntimeError:
        fp16_w = None
    # two-level per-channel int8: W ~= s (q1 + q2 / 254), one [2V, K] matrix
    r = W / w_s[:, None] - Wq.float()
    Wq2 = torch.round(r * 254).clamp(-127, 127).to(torch.int8)
    Wq12_kn = torch.cat([Wq, Wq2]).t().contiguous()  # [K, 2V]
    try:
        qlin_w = torch.ops.onednn.qlinear_prepack(Wq, [1, K])
    except RuntimeError:
        qlin_w = None

    def int_mm(x: torch.Tensor, b: torch.Tensor = Wq_kn) -> torch.Tensor:
        q, s = quant_rows_int8(x)
        return torch._int_mm(q, b).float().mul_(s[:, None]).mul_(w_s)

    def int_mm_split(x: torch.Tensor) -> torch.Tensor:
        """x ~= s1 q1 + s2 q2 (the residual quantized again): 2 rows per row, one pass over
        the weights, activation error ~1/127 of a single quantization."""
        q1, s1 = quant_rows_int8(x)
        q2, s2 = quant_rows_int8(x - q1.float() * s1[:, None])
        m = x.shape[0]
        acc = torch._int_mm(torch.cat([q1, q2]), Wq_kn).float()
        return (acc[:m].mul_(s1[:, None]) + acc[m:].mul_(s2[:, None])).mul_(w_s)

    def int_mm_2level(x: torch.Tensor) -> torch.Tensor:
        q1, s1 = quant_rows_int8(x)
        q2, s2 = quant_rows_int8(x - q1.float() * s1[:, None])
        m = x.shape[0]
        acc = torch._int_mm(torch.cat([q1, q2]), Wq12_kn).float()  # [2m, 2V]
        acc = acc[:, :V].add_(acc[:, V:], alpha=1 / 254)
        return (acc[:m].mul_(s1[:, None]) + acc[m:].mul_(s2[:, None])).mul_(w_s)

    def q8_0_blocks(x: torch.Tensor) -> torch.Tensor:
        xb = x.view(x.shape[0], K // 32, 32)
        sx = xb.abs().amax(-1).clamp(min=1e-30) / 127.0  # [M, 18]
        qx = torch.round(xb / sx[..., None]).to(torch.int8)
        out = torch.zeros(x.shape[0], V)
        for b in range(K // 32):
            acc = torch._int_mm(qx[:, b].contiguous(), Q8_blocks[b]).float()
            out.addcmul_(acc * sx[:, b:b + 1], d_t[b])
        return out

    def dynamic(eng: str):
        def f(x: torch.Tensor) -> torch.Tensor:
            torch.backends.quantized.engine = eng
            return torch.ops.quantized.linear_dynamic(x, dyn[eng], False)
        return f

    def qlinear(x: torch.Tensor) -> torch.Tensor:
        lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
        sc = max(hi - lo, 1e-30) / 255.0
        zp = int(round(-lo / sc))
        qx = torch.clamp(torch.round(x / sc) + zp, 0, 255).to(torch.uint8)
        return torch.ops.onednn.qlinear_pointwise(qx, sc, zp, qlin_w, w_s, torch.zeros(V, dtype=torch.long),
                                                  None, 1.0, 0, torch.float32, "none", [], "")

    kernels: dict[str, tuple[object, int, bool]] = {  # name: (fn, bytes read, fp32 output)
        "fp32 F.linear": (lambda x: F.linear(x, W), V * K * 4, True),
        "fp32 oneDNN packed (today)": (lambda x: onednn_linear(x, fp32_pk), V * K * 4, True),
        "int8/ch x int8/row _int_mm": (int_mm, V * K, True),
        "int8/ch _int_mm [V,K].t()": (lambda x: int_mm(x, Wq_t), V * K, True),
        "int8/ch x int8/row split x2": (int_mm_split, V * K, True),
        "Q8_0 exact 18-block _int_mm": (q8_0_blocks, V * K + V * K // 32 * 4, True),
        "bf16 oneDNN packed": (lambda x: onednn_linear(x.to(torch.bfloat16), bf16_pk).float(),
                               V * K * 2, False),
        "int8pack_mm bf16 in": (lambda x: torch.ops.aten._weight_int8pack_mm(
            x.to(torch.bfloat16), Wq, w_s_bf).float(), V * K, False),
        "int8pack_mm fp32 in": (lambda x: torch.ops.aten._weight_int8pack_mm(
            x, Wq, w_s_bf.float()), V * K, True),
    }
    kernels["int8 2-level w + split x"] = (int_mm_2level, 2 * V * K, True)
    if fp16_w is not None:
        kernels["fp16 fbgemm (fp32 in/out)"] = (
            lambda x: torch.ops.quantized.linear_dynamic_fp16(x, fp16_w), V * K * 2, True)
    for eng in dyn:
        kernels[f"{eng} linear_dynamic"] = (dynamic(eng), V * K, True)
    if qlin_w is not None:
        kernels["onednn qlinear u8/tensor"] = (qlinear, V * K, True)
    if args.only:
        keep = args.only.split(",")
        kernels = {k: v for k, v in kernels.items() if k in keep}

    rows = [int(r) for r in args.rows.split(",")]
    sweep = torch.zeros(24 << 20)  # 96 MB
    refmax = ref.abs().max()
    print(f"{len(H)} hidden rows; logits max |{float(refmax):.2f}|; torch {torch.__version__}, "
          f"{args.threads} threads; min ms of {args.runs} runs (provisional: shared CPU)\n")
    hdr = f"{'kernel':<30} {'MB':>5} {'out':>4} " + " ".join(f"{r:>6}" for r in rows) + \
        "   max|err|  argmax moved"
    print(hdr)
    for name, (fn, nbytes, out32) in kernels.items():
        try:
            got = torch.cat([fn(H[i:i + 32]) for i in range(0, len(H), 32)])
        except (RuntimeError, NotImplementedError) as exc:
            print(f"{name:<30} failed: {str(exc).splitlines()[0][:80]}")
            continue
        err = float((got.float() - ref).abs().max())
        moved = int((got.argmax(1) != ref.argmax(1)).sum())
        times = []
        for r in rows:
            x = H[:r].contiguous()
            for _ in range(3):
                fn(x)
            best = float("inf")
            for _ in range(args.runs):
                if args.cold:
                    sweep.add_(1)
                t0 = time.perf_counter()
                fn(x)
                best = min(best, time.perf_counter() - t0)
            times.append(best * 1e3)
        print(f"{name:<30} {nbytes / 1e6:>5.0f} {'fp32' if out32 else 'bf16':>4} "
              + " ".join(f"{t:>6.2f}" for t in times) + f"   {err:8.4f}  {moved:>3}/{len(H)}",
              flush=True)
    torch.backends.quantized.engine = prev_engine


if __name__ == "__main__":
    main()
