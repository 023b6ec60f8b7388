"""Greedy agreement of the fp16 unembedding with the fp32 one, in one greedy run.

The two engines differ only in the logits' weights, so their greedy runs share every hidden
state until the first position where the fp16 logits pick another token. This runs the
fp32 unembedding (int4 trunk by default) greedily, speculation off, and at every position
also computes the fp16 logits of the same hidden row: the first position where their
argmax differs is where a run with --unembed fp16 leaves this one (same batch, same
schedule up to there). For each prompt it reports that position and the fp32 top-2
logprob margin there (a near-tie is small), plus every disagreement along the fp32 path.
Half the cost of divergence.py's two runs (which run_format also supports: --formats
int4::fp32,int4::fp16).

    python benchmarks/unembed_agreement.py --num-prompts 24 --max-tokens 128
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from mtpserve.decoding.config import EngineConfig, SamplingParams, SpecConfig
from mtpserve.decoding.engine.llm_engine import LLMEngine
from mtpserve.decoding.model.linear import fp16_linear, pack_fp16
from mtpserve.decoding.tools.bench.prompts import encode_prompts, load_prompts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", default="auto")
    ap.add_argument("--prompts", default=None)
    ap.add_argument("--num-prompts", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    eng = LLMEngine.from_config(EngineConfig(weights=args.weights, unembed="fp32",
                                             max_num_seqs=args.batch,
                                             max_model_len=args.max_tokens + 1024,
                                             spec=SpecConfig(mode="off")))
    model = eng.model
    assert model.unembed_format == "dense"
    packed = pack_fp16(model.unembed_weight())
    if packed is None:
        raise SystemExit("this PyTorch build has no FBGEMM fp16 GEMM")
    shadow: dict[str, torch.Tensor] = {}
    compute_logits, accept = model.compute_logits, eng.committer.accept

    def both(h: torch.Tensor) -> torch.Tensor:
        out = compute_logits(h)
        shadow["fp16"], shadow["fp32"] = fp16_linear(h, packed), out
        return out

    flips: dict[str, list[dict]] = {}
    counted = [0]

    def checked(item, seq_logits):
        row = (seq_logits.storage_offset() - shadow["fp32"].storage_offset()) // seq_logits.shape[-1]
        l32, l16 = seq_logits[-1], shadow["fp16"][row + len(seq_logits) - 1]
        rid = item.seq.request_id
        pos = len(item.seq.token_ids) - item.seq.prompt_len
        counted[0] += 1
        a32, a16 = int(l32.argmax()), int(l16.argmax())
        if a32 != a16:
            lp = l32.double().log_softmax(-1)
            top = lp.topk(2)
            flips.setdefault(rid, []).append({
                "position": pos, "fp32_token": a32, "fp16_token": a16,
                "fp32_margin": float(top.values[0] - top.values[1]),
                "fp16_token_gap": float(lp[a32] - lp[a16]),
                "max_abs_logit_diff": float((l32 - l16).abs().max())})
        return accept(item, seq_logits)

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
          f"greedy with the fp16 unembedding identical to fp32 for "
          f"{len(prompts) - len(first)}/{len(prompts)} prompts")
    for rid, f in first.items():
        print(f"  {rid}: first flip at token {f['position']}: fp32 top-2 margin "
              f"{f['fp32_margin']:.4f} (max |logit diff| there {f['max_abs_logit_diff']:.4f})")
    every = [f for fs in flips.values() for f in fs]
    print(f"disagreements along the fp32 paths: {len(every)} of {counted[0]} positions; "
          f"largest fp32 margin at one: "
          f"{max((f['fp32_margin'] for f in every), default=0):.4f}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"args": vars(args), "positions": counted[0], "flips": flips}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
