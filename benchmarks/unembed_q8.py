"""The Q8_0 unembedding (--unembed q8) against fp16 FBGEMM and fp32 dense: kernel time per
row count, logit error on real hidden states, whole-model decode, greedy agreement.

One engine (the default int4 trunk, speculation off) with the fp32 unembedding; the fp16
and q8 copies are built beside it and swapped into CausalLM (compute_logits reads q8, then
fp16, then fp32), so every comparison runs in one process on the same trunk:

1. Greedy over HumanEval prompts with the fp32 logits, computing the q8 and fp16 logits of
   every row too: the first position where one's argmax differs is where a run with that
   unembedding would leave the fp32 one (the runs share every hidden state up to there), so
   "identical" counts prompts with no flip; at each first flip the fp32 top-2 margin. The
   hidden rows are kept for 2.
2. ms per call for M rows (min over --kernel-repeats, the kernels interleaved per M) of each
   kernel, max |logit - fp32 dense| over the real hidden rows. "q8 fp32-act (previous)" is
   the kernel before int16 activations (commit 5a18ef6, built from git under its own op
   namespace by q8_unembed_previous.py; left out where that cannot build).
3. decode ms/step at batch 1 and 16 with fp16 vs q8 logits (and the previous q8 kernel
   where it built), interleaved, min of repeats (--skip-decode: not run).

    flock /tmp/cpu.lock python benchmarks/unembed_q8.py
"""

from __future__ import annotations

import argparse
import time

import torch

from mtpserve.decoding.config import EngineConfig, SamplingParams, SpecConfig
from mtpserve.decoding.engine.llm_engine import LLMEngine
from mtpserve.decoding.model import q8_unembed
from mtpserve.decoding.model.linear import fp16_linear, onednn_linear, pack_fp16
from mtpserve.decoding.tools.bench.prompts import encode_prompts, load_prompts

from compiled_step import decode_ms_per_step  # this folder: the same timing loop
from q8_unembed_previous import load_previous  # this folder

ROWS = (1, 2, 4, 8, 16, 32, 64)


def time_interleaved(kernels: dict, x: torch.Tensor, calls: int, repeats: int) -> dict:
    """Min ms per call of each kernel on x, the kernels taking turns in every repeat (so a
    noisy stretch of a shared machine hits all of them)."""
    best = dict.fromkeys(kernels, float("inf"))
    for _ in range(repeats):
        for name, fn in kernels.items():
            fn(x)
            t0 = time.perf_counter()
            for _ in range(calls):
                fn(x)
            best[name] = min(best[name], (time.perf_counter() - t0) / calls)
    return {name: 1000 * t for name, t in best.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kernel-repeats", type=int, default=7)
    ap.add_argument("--skip-decode", action="store_true")
    args = ap.parse_args()
    if not q8_unembed.available():
        raise SystemExit("the Q8 unembedding kernel does not load here")
    eng = LLMEngine.from_config(EngineConfig(unembed="fp32", max_num_seqs=args.num_prompts,
                                             max_model_len=args.max_tokens + 1024,
                                             spec=SpecConfig(mode="off")))
    model = eng.model
    assert model.unembed_format == "dense" and model.unembed_packed is not None
    w = model.unembed_weight().detach()
    v = model.config.vocab_size
    blocks = q8_unembed.recover(w)
    if blocks is None:
        raise SystemExit("the unembedding is not a Q8_0 tensor")
    q8, fp16, fp32 = q8_unembed.pack(*blocks), pack_fp16(w), model.unembed_packed
    kernels = {"fp32 dense (oneDNN packed)": lambda x: onednn_linear(x, fp32),
               "fp16 FBGEMM": lambda x: fp16_linear(x, fp16),
               "q8 (ours)": lambda x: q8_unembed.mm(x, q8, v)}
    prev = load_previous()
    if prev is not None:
        q8_prev = prev.pack(*blocks)
        kernels["q8 fp32-act (previous)"] = lambda x: prev.mm(x, q8_prev, v)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, trunk "
          f"{eng.weight_format}, ISA path {torch.ops.mtpserve_q8.isa()} (2: AVX-512 F+BW+VNNI)")

    # 1. greedy agreement along the fp32 path, collecting hidden rows
    compute, accept = model.compute_logits, eng.committer.accept
    shadow: dict[str, torch.Tensor] = {}
    hidden: list[torch.Tensor] = []
    flips: dict[str, dict[str, dict]] = {"q8": {}, "fp16": {}}

    def all_three(h: torch.Tensor) -> torch.Tensor:
        out = compute(h)
        shadow["fp32"], shadow["q8"], shadow["fp16"] = out, kernels["q8 (ours)"](h), \
            kernels["fp16 FBGEMM"](h)
        hidden.append(h.detach().clone())
        return out

    def checked(item, seq_logits, *rest):  # rest: what else the committer takes
        row = (seq_logits.storage_offset() - shadow["fp32"].storage_offset()) // v
        row += len(seq_logits) - 1
        l32 = seq_logits[-1]
        rid = item.seq.request_id
        a32 = int(l32.argmax())
        for name in ("q8", "fp16"):
            other = shadow[name][row]
            if int(other.argmax()) != a32 and rid not in flips[name]:
                top = l32.double().log_softmax(-1).topk(2).values
                flips[name][rid] = {"position": len(item.seq.token_ids) - item.seq.prompt_len,
                                    "margin": float(top[0] - top[1]),
                                    "max_diff": float((l32 - other).abs().max())}
        return accept(item, seq_logits, *rest)

    model.compute_logits, eng.committer.accept = all_three, checked
    _, src = load_prompts(None, args.num_prompts)
    prompts = encode_prompts(eng.tokenizer, src)
    for i, p in enumerate(prompts):
        eng.add_request(f"p{i}", p, SamplingParams(max_tokens=args.max_tokens, temperature=0.0,
                                                   ignore_eos=True, speculate=False))
    while eng.has_unfinished():
        eng.step()
    model.compute_logits, eng.committer.accept = compute, accept

    # 2. kernels
    h = torch.cat(hidden)
    print(f"\nreal hidden rows: {len(h)} (prefill last rows + decode rows of "
          f"{len(prompts)} HumanEval prompts)")
    ref = torch.cat([kernels["fp32 dense (oneDNN packed)"](c) for c in h.split(64)])
    ref64 = torch.cat([c.double() @ w.double().t() for c in h.split(256)])
    errs = {}
    for name, fn in kernels.items():
        got = torch.cat([fn(c) for c in h.split(64)])
        errs[name] = (float((got - ref).abs().max()), float((got.double() - ref64).abs().max()))
    times: dict[str, dict[int, float]] = {name: {} for name in kernels}
    for m in ROWS:
        got = time_interleaved(kernels, h[:m].contiguous(), max(4, 60 // m), args.kernel_repeats)
        for name, ms in got.items():
            times[name][m] = ms
    print("\n| kernel | " + " | ".join(f"M={m} ms" for m in ROWS)
          + " | max abs err vs fp32 dense | vs fp64 |")
    print("|---|" + "---|" * len(ROWS) + "---|---|")
    for name in kernels:
        print(f"| {name} | " + " | ".join(f"{times[name][m]:.3f}" for m in ROWS)
              + f" | {errs[name][0]:.2e} | {errs[name][1]:.2e} |")

    if prev is not None:
        print("\nq8 previous / ours: " + ", ".join(
            f"M={m} {times['q8 fp32-act (previous)'][m] / times['q8 (ours)'][m]:.2f}x"
            for m in ROWS))
    n = len(prompts)
    print(f"\ngreedy, {n} HumanEval prompts x {args.max_tokens} tokens, identical to the fp32 "
          f"dense unembedding: q8 {n - len(flips['q8'])}/{n}, fp16 {n - len(flips['fp16'])}/{n}")
    for name in ("q8", "fp16"):
        for rid, f in sorted(flips[name].items()):
            print(f"  {name} {rid}: first difference at token {f['position']}, fp32 top-2 "
                  f"logprob margin {f['margin']:.4f} (max |logit diff| {f['max_diff']:.4f})")
    if args.skip_decode:
        return

    # 3. whole model: fp16 vs q8 logits (and the previous q8 kernel), interleaved
    ours_mm = q8_unembed.mm

    def use(name: str) -> None:
        model.unembed_q8 = q8 if name == "q8" else q8_prev if name == "q8 previous" else None
        model.unembed_fp16 = fp16 if name == "fp16" else None
        # compute_logits calls q8_unembed.mm: the previous kernel swapped in for its run
        q8_unembed.mm = prev.mm if name == "q8 previous" else ours_mm

    names = ["fp16", "q8"] + (["q8 previous"] if prev is not None else [])
    res: dict[str, dict[int, float]] = {name: {} for name in names}
    batches = (1, min(16, len(prompts)))
    try:
        for _ in range(args.repeats):
            for name in names:
                use(name)
                for b in batches:
                    ms = decode_ms_per_step(eng, prompts[:b], args.decode_tokens)
                    res[name][b] = min(res[name].get(b, float("inf")), ms)
    finally:
        use("fp32")
    print(f"\n| decode (int4 trunk, speculation off, min of {args.repeats}) | "
          + " | ".join(f"--unembed {name}" for name in names) + " | q8 saves vs fp16 |")
    print("|---|" + "---|" * len(names) + "---|")
    for b in batches:
        a, c = res["fp16"][b], res["q8"][b]
        print(f"| batch {b}: ms/step | " + " | ".join(f"{res[name][b]:.2f}" for name in names)
              + f" | {a - c:.2f} ms ({a / c:.3f}x) |")

if __name__ == "__main__":
    main()
