"""Greedy agreement of the fp16 or q8 unembedding with the fp32 one, in one greedy run.

The two engines differ only in the logits' kernel, so their greedy runs share every hidden
state until the first position where the other logits pick another token. This runs the
fp32 unembedding (int4 trunk by default) greedily, speculation off, and at every position
also computes the --compare logits (fp16: FBGEMM over an fp16 copy; q8: the Q8_0 kernel,
int16 activations) of the same hidden row: the first position where their argmax differs
is where a run with --unembed fp16/q8 leaves this one (same batch, same schedule up to
there). For each prompt it reports that position and the fp32 top-2 logprob margin there
(a near-tie is small), plus every disagreement along the fp32 path. Half the cost of
divergence.py's two runs (which run_format also supports: --formats int4::fp32,int4::fp16).

    python benchmarks/unembed_agreement.py --num-prompts 24 --max-tokens 128 [--compare q8]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from mtpserve.decoding.config import EngineConfig, SamplingParams, SpecConfig
from mtpserve.decoding.engine.llm_engine import LLMEngine
from mtpserve.decoding.model import q8_unembed
from mtpserve.decoding.model.linear import fp16_linear, pack_fp16
from mtpserve.decoding.tools.bench.prompts import encode_prompts, load_prompts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", default="auto")
    ap.add_argument("--prompts", default=None)
    ap.add_argument("--num-prompts", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--compare", choices=("fp16", "q8"), default="fp16")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    eng = LLMEngine.from_config(EngineConfig(weights=args.weights, unembed="fp32",
                                             max_num_seqs=args.batch,
                                             max_model_len=args.max_tokens + 1024,
                                             spec=SpecConfig(mode="off")))
    model = eng.model
    assert model.unembed_format == "dense"
    other_name = args.compare
    if other_name == "fp16":
        packed = pack_fp16(model.unembed_weight())
        if packed is None:
            raise SystemExit("this PyTorch build has no FBGEMM fp16 GEMM")

        def other(h: torch.Tensor) -> torch.Tensor:
            return fp16_linear(h, packed)
    else:
        blocks = q8_unembed.recover(model.unembed_weight().detach())
        if not q8_unembed.available() or blocks is None:
            raise SystemExit("no Q8 unembedding here (kernel or Q8_0 values missing)")
        packed_q8, vocab = q8_unembed.pack(*blocks), model.config.vocab_size

        def other(h: torch.Tensor) -> torch.Tensor:
            return q8_unembed.mm(h, packed_q8, vocab)
    shadow: dict[str, torch.Tensor] = {}
    compute_logits, accept = model.compute_logits, eng.committer.accept

    def both(h: torch.Tensor) -> torch.Tensor:
        out = compute_logits(h)
        shadow["other"], shadow["fp32"] = other(h), out
        return out

    flips: dict[str, list[dict]] = {}
    counted = [0]
    closest = {"diff": 0.0, "margin": float("inf")}  # over every position

    def checked(item, seq_logits, *rest):  # rest: what else the committer takes
        row = (seq_logits.storage_offset() - shadow["fp32"].storage_offset()) // seq_logits.shape[-1]
        l32, l16 = seq_logits[-1], shadow["other"][row + len(seq_logits) - 1]
        rid = item.seq.request_id
        pos = len(item.seq.token_ids) - item.seq.prompt_len
        counted[0] += 1
        a32, a16 = int(l32.argmax()), int(l16.argmax())
        closest["diff"] = max(closest["diff"], float((l32 - l16).abs().max()))
        top2 = l32.double().log_softmax(-1).topk(2).values
        closest["margin"] = min(closest["margin"], float(top2[0] - top2[1]))
        if a32 != a16:
            lp = l32.double().log_softmax(-1)
            top = lp.topk(2)
            flips.setdefault(rid, []).append({
                "position": pos, "fp32_token": a32, f"{other_name}_token": a16,
                "fp32_margin": float(top.values[0] - top.values[1]),
                f"{other_name}_token_gap": float(lp[a32] - lp[a16]),
                "max_abs_logit_diff": float((l32 - l16).abs().max())})
        return accept(item, seq_logits, *rest)

    model.compute_logits, eng.committer.accept = both, checked
    _, src = load_prompts(args.prompts, args.num_prompts)
    prompts = encode_prompts(eng.tokenizer, src)
    rids = []
    for i, p in enumerate(prompts):
        rid = f"p{i}"
        rids.append(rid)
        eng.add_request(rid, p, SamplingParams(max_tokens=args.max_tokens, temperature=0.0,
                                               ignore_eos=True, speculate=False))
    while eng.has_unfinished():
        eng.step()
    first = {rid: flips[rid][0] for rid in rids if rid in flips}
    print(f"\n{len(prompts)} prompts x {args.max_tokens} tokens, weights {eng.weight_format}: "
          f"greedy with the {other_name} unembedding identical to fp32 for "
          f"{len(prompts) - len(first)}/{len(prompts)} prompts")
    for rid, f in first.items():
        print(f"  {rid}: first flip at token {f['position']}: fp32 top-2 margin "
              f"{f['fp32_margin']:.4f} (max |logit diff| there {f['max_abs_logit_diff']:.4f})")
    every = [f for fs in flips.values() for f in fs]
    print(f"disagreements along the fp32 paths: {len(every)} of {counted[0]} positions; "
          f"largest fp32 margin at one: "
          f"{max((f['fp32_margin'] for f in every), default=0):.4f}")
    print(f"over all positions: max |logit diff| {closest['diff']:.2e}, smallest fp32 top-2 "
          f"margin {closest['margin']:.2e}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"args": vars(args), "positions": counted[0], "flips": flips}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
