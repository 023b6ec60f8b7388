"""Where draft acceptance is lost: the same positions scored three ways, no timing involved.

The served engine (default weights, speculation off) answers the prompts greedily; the
trunk runs once over prompt+answer in the served weight format; then, at every answer
position t, the heads draft a top-1 chain of `--depth` tokens from h_t and x_{t+1}:
  train-eval    train-heads' held-out scorer (evaluate_chain, fp32 module)
  served-fp32   the serving path (`candidates()`, what the drafter calls), module in fp32
                (chain-attention heads only)
  served        the same after `prepare()`: the module as the engine holds it (int4
                projections and draft-vocabulary rows over an int4 trunk)
  engine        the engine itself decoding the prompts with `--speculate on --proposer
                heads` and the chain as its tree: acceptance per draft position
The first three score every answer position: P(the chain's first d tokens equal the
greedy answer's). The engine drafts only after each verify step, so its rate is over
steps, not positions. Equal train-eval and served-fp32 rows mean no train/serve gap in
the chain's inputs; served vs served-fp32 is the module's quantization; all of them far
below the heads' held-out figures (heads.json training.heldout) is the prompts'
distribution. `bench --compare` also depends on what `--speculate auto` chooses per step
and on prompt lookup; this script does not.

    .venv/bin/python benchmarks/chain_acceptance.py --prompts benchmarks/prompts/chat16.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch


def chain_rates(top1: torch.Tensor, tgts: torch.Tensor) -> list[float]:
    """top1, tgts [M, D] -> P(first d drafts all right) for d = 1..D (targets -1: miss)."""
    ok = (top1 == tgts) & (tgts >= 0)
    return [round(float(x), 4) for x in torch.cumprod(ok.float(), 1).mean(0)]


def served_top1(heads, model, cache, rows: torch.Tensor, depth: int, batch: int = 256
                ) -> torch.Tensor:
    """[M, depth] top-1 chain through `candidates()`, fed h_t, x_{t+1} (the greedy token)
    and position t, as the drafter feeds the last accepted token's row."""
    from mtpserve.decoding.training.train_sequential import row_positions
    pos = row_positions(cache)
    out = []
    for s in range(0, len(rows), batch):
        r = rows[s:s + batch]
        c = heads.candidates(cache.hidden[r].to(model.unembed_weight().dtype), model,
                             cache.argmax[r].tolist(), depth, positions=pos[r].tolist())
        out.append(torch.tensor([[d[0] for d in seq] for seq in c]))
    return torch.cat(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", default=None, help="JSONL (default: HumanEval)")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--heads", default=None, help="heads folder (default: shipped)")
    p.add_argument("--depth", type=int, default=3)
    a = p.parse_args(argv)

    from mtpserve.decoding.config import EngineConfig, SamplingParams, SpecConfig
    from mtpserve.decoding.engine.llm_engine import LLMEngine
    from mtpserve.decoding.spec.heads_io import load_heads
    from mtpserve.decoding.tools.bench.compare import merge_spec_stats
    from mtpserve.decoding.tools.bench.prompts import encode_prompts, load_prompts
    from mtpserve.decoding.training.heads_data import Example
    from mtpserve.decoding.training.hidden_cache import cache_hidden, targets_for
    from mtpserve.decoding.training.train_sequential import evaluate_chain

    chain = Path(tempfile.mkdtemp()) / "chain.json"
    chain.write_text(json.dumps([[0] * d for d in range(1, a.depth + 1)]))
    engine = LLMEngine.from_config(EngineConfig(
        compile="off", spec=SpecConfig(mode="on", proposer="heads", heads_path=a.heads,
                                       tree=str(chain))))
    if engine.heads is None or not hasattr(engine.heads, "mods"):
        raise SystemExit("needs sequential heads")
    model = engine.model
    name, prompts = load_prompts(a.prompts, a.num_prompts)
    ids = encode_prompts(engine.tokenizer, prompts)
    outs = engine.generate(ids, SamplingParams(max_tokens=a.max_tokens, temperature=0.0,
                                               speculate=False, ignore_eos=True))
    # t from the prompt's last token on (the first draft follows the prefill)
    examples = [Example(pr + o["token_ids"], len(pr) - 1) for pr, o in zip(ids, outs)]
    cache = cache_hidden(model, examples)
    # at t the chain is fed x_{t+1} = argmax[t]; depth d must equal argmax[t + d]
    rows, tg = targets_for(cache, list(range(cache.num_seqs)), a.depth, "argmax")
    fp32 = load_heads(a.heads or engine.config.spec.heads_path or _shipped(engine), model.config)
    fp32 = fp32.float().eval()
    results = {}
    ev = evaluate_chain(fp32, model, cache, rows, tg, "argmax",
                        vocab_ids=fp32.draft_vocab)
    acc = [0.0] + ev["chain_accepted"]  # cumulative: drafts accepted by chains of length d
    results["train-eval"] = [round(acc[d + 1] - acc[d], 4) for d in range(a.depth)]
    if not fp32.context:
        with torch.no_grad():
            results["served-fp32"] = chain_rates(served_top1(fp32, model, cache, rows, a.depth),
                                                 tg)
            results["served"] = chain_rates(served_top1(engine.heads, model, cache, rows,
                                                        a.depth), tg)
    spec = engine.generate(ids, SamplingParams(max_tokens=a.max_tokens, temperature=0.0,
                                               speculate=True, ignore_eos=True))
    if any(o["token_ids"] != s["token_ids"] for o, s in zip(outs, spec)):
        print("note: greedy output changed with speculation on", file=sys.stderr)
    stats = merge_spec_stats([o["spec"] for o in spec]).to_dict()
    results["engine"] = [round(x, 4) for x in stats["acceptance_rate_per_position"]]
    print(f"{name}: {len(prompts)} prompts, {len(rows)} positions, weights "
          f"{engine.weight_format}")
    for k, v in results.items():
        print(f"  {k:22s} " + "  ".join(f"{x:.4f}" for x in v))
    return 0


def _shipped(engine) -> str:
    from mtpserve.decoding.spec.heads_io import shipped_heads
    return str(shipped_heads(engine.model.config.fingerprint()))


if __name__ == "__main__":
    sys.exit(main())
