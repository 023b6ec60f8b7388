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
2. ms per call for M rows (median of the best repeats) of each kernel, max |logit - fp32
   dense| over the real hidden rows.
3. decode ms/step at batch 1 and 16 with fp16 vs q8 logits, interleaved, min of repeats.

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

ROWS = (1, 2, 4, 8, 16, 32, 64)


def time_ms(fn, x: torch.Tensor, calls: int, repeats: int = 5) -> float:
    fn(x)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn(x)
        best = min(best, (time.perf_counter() - t0) / calls)
    return 1000 * best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
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
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, trunk "
          f"{eng.weight_format}, ISA path {torch.ops.mtpserve_q8.isa()} (2: AVX-512F)")

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

    def checked(item, seq_logits):
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
        return accept(item, seq_logits)

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
    times = {name: {m: time_ms(fn, h[:m].contiguous(), calls=max(4, 60 // m))
                    for m in ROWS} for name, fn in kernels.items()}
    print("\n| kernel | " + " | ".join(f"M={m} ms" for m in ROWS)
          + " | max abs err vs fp32 dense | vs fp64 |")
    print("|---|" + "---|" * len(ROWS) + "---|---|")
    for name in kernels:
        print(f"| {name} | " + " | ".join(f"{times[name][m]:.3f}" for m in ROWS)
              + f" | {errs[name][0]:.2e} | {errs[name][1]:.2e} |")

    # 3. whole model: fp16 vs q8 logits, interleaved
    def use(name: str) -> None:
        model.unembed_q8 = q8 if name == "q8" else None
        model.unembed_fp16 = fp16 if name == "fp16" else None

    res: dict[str, dict[int, float]] = {"fp16": {}, "q8": {}}
    batches = (1, min(16, len(prompts)))
    for _ in range(args.repeats):
        for name in ("fp16", "q8"):
            use(name)
            for b in batches:
                ms = decode_ms_per_step(eng, prompts[:b], args.decode_tokens)
                res[name][b] = min(res[name].get(b, float("inf")), ms)
    use("fp32")
    print(f"\n| decode (int4 trunk, speculation off, min of {args.repeats}) | --unembed fp16 | "
          "--unembed q8 | q8 saves |")
    print("|---|---|---|---|")
    for b in batches:
        a, c = res["fp16"][b], res["q8"][b]
        print(f"| batch {b}: ms/step | {a:.2f} | {c:.2f} | {a - c:.2f} ms ({a / c:.3f}x) |")

    n = len(prompts)
    print(f"\ngreedy, {n} HumanEval prompts x {args.max_tokens} tokens, identical to the fp32 "
          f"dense unembedding: q8 {n - len(flips['q8'])}/{n}, fp16 {n - len(flips['fp16'])}/{n}")
    for name in ("q8", "fp16"):
        for rid, f in sorted(flips[name].items()):
            print(f"  {name} {rid}: first difference at token {f['position']}, fp32 top-2 "
                  f"logprob margin {f['margin']:.4f} (max |logit diff| {f['max_diff']:.4f})")


if __name__ == "__main__":
    main()
