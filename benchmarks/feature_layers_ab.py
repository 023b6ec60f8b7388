"""Do features from more trunk layers make the sequential module draft better? (EAGLE-3)

EAGLE-3 feeds its draft module a projection of low, middle and high layers' hidden states
instead of the last one alone. This script measures that on our data before any engine
change: both arms start from the same module weights (the shipped heads by default) and
continue training on the same positions in the same order, same steps and learning rate:
  last    h0 = the trunk's final-normed h_t (what the engine feeds today)
  fused   h0 = fc(cat[norm(x_low), norm(x_mid), h_t]), x_i the residual stream after
          layer i; fc starts as [0 | 0 | I], so the arm starts exactly where `last` does
Scored on held-out Magpie prompts (split by prompt as train-heads splits) and on prompts
from outside the training set (chat16, HumanEval; greedy answers of the served engine):
P(the top-1 chain's first d drafts all equal the trunk's greedy tokens), the timing-free
acceptance `benchmarks/chain_acceptance.py` reports.

    .venv/bin/python benchmarks/feature_layers_ab.py --data magpie12k.jsonl \\
        --generated magpie12k_answers.jsonl --train-seqs 1500
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class LayerTap:
    """Forward hooks that keep the residual stream after some trunk layers (bf16, CPU)."""

    def __init__(self, model: nn.Module, layers: list[int]) -> None:
        self.out: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
        self.hooks = [model.layers[i].register_forward_hook(self._keep(i)) for i in layers]

    def _keep(self, i: int):
        def hook(_mod, _inp, out):
            self.out[i].append(out.detach().to("cpu", torch.bfloat16))
        return hook

    def take(self) -> list[torch.Tensor]:
        feats = [torch.cat(v) for v in self.out.values()]
        for v in self.out.values():
            v.clear()
        return feats

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


class Fuse(nn.Module):
    """fc(cat[norm(x_low), norm(x_mid), h]) starting as the identity on h."""

    def __init__(self, hidden: int, extra: int, eps: float) -> None:
        super().__init__()
        self.norms = nn.ModuleList(nn.RMSNorm(hidden, eps=eps) for _ in range(extra))
        self.fc = nn.Linear((extra + 1) * hidden, hidden, bias=False)
        with torch.no_grad():
            self.fc.weight.zero_()
            self.fc.weight[:, extra * hidden:] = torch.eye(hidden)

    def forward(self, extra: list[torch.Tensor], h: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([n(x.float()) for n, x in zip(self.norms, extra)] + [h], -1))


def tapped_cache(model, examples, layers: list[int], say):
    from mtpserve.decoding.training.hidden_cache import cache_hidden
    tap = LayerTap(model, layers)
    try:
        cache = cache_hidden(model, examples, progress=say)
    finally:
        tap.close()
    return cache, tap.take()


def chain_acceptance(h0_of, heads, model, cache, rows, tgts, ids, unembed, batch=512):
    """P(first d top-1 drafts right) for d = 1..D, drafting in the draft vocabulary."""
    from mtpserve.decoding.training.train_sequential import (
        chain_inputs,
        chain_logits,
        row_positions,
    )
    D = tgts.shape[1]
    pos = row_positions(cache)
    ok_sum = torch.zeros(D)
    with torch.no_grad():
        for s in range(0, len(rows), batch):
            r = rows[s:s + batch]
            lg = chain_logits(heads, model, h0_of(r), chain_inputs(cache, r, D, "argmax"),
                              pos[r], unembed)
            top = ids[lg.argmax(-1)]
            tg = tgts[s:s + batch]
            ok_sum += torch.cumprod(((top == tg) & (tg >= 0)).float(), 1).sum(0)
    return [round(float(x), 4) for x in ok_sum / max(1, len(rows))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="prompts JSONL (train-heads --data)")
    p.add_argument("--generated", required=True, help="its cached answers (train-heads --generated)")
    p.add_argument("--train-seqs", type=int, default=1500)
    p.add_argument("--holdout-frac", type=float, default=0.05)
    p.add_argument("--layers", default="2,15", help="extra trunk layers fused with h_t")
    p.add_argument("--heads", default=None, help="start weights (default: shipped)")
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-tokens", type=int, default=1024)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--unseen-max-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    say = lambda m: print(m, file=sys.stderr, flush=True)

    from mtpserve.decoding.config import EngineConfig, SamplingParams, SpecConfig
    from mtpserve.decoding.engine.llm_engine import LLMEngine
    from mtpserve.decoding.spec.heads_io import load_heads, shipped_heads
    from mtpserve.decoding.tools.bench.prompts import encode_prompts, load_prompts
    from mtpserve.decoding.training.answer_gen import generate_answers
    from mtpserve.decoding.training.heads_data import Example, read_sources
    from mtpserve.decoding.training.hidden_cache import split_sequences, targets_for
    from mtpserve.decoding.training.train_sequential import (
        chain_inputs,
        chain_logits,
        row_positions,
        teacher_probs,
    )

    layers = [int(x) for x in a.layers.split(",")]
    engine = LLMEngine.from_config(EngineConfig(compile="off", spec=SpecConfig(mode="off")))
    model = engine.model
    model.requires_grad_(False)
    cfg = model.config
    src = read_sources([a.data], engine.tokenizer)
    examples, _ = generate_answers(engine, src.prompts, Path(a.generated), 256,
                                   only_cached=True)
    train_all, hold = split_sequences(len(examples), a.holdout_frac, 0)
    train = train_all[:a.train_seqs]
    sets = {"train": [examples[i] for i in train], "heldout": [examples[i] for i in hold]}
    for name, file in (("chat16", "benchmarks/prompts/chat16.jsonl"), ("humaneval16", None)):
        _, prompts = load_prompts(file, 16)
        ids = encode_prompts(engine.tokenizer, prompts)
        outs = engine.generate(ids, SamplingParams(max_tokens=a.unseen_max_tokens,
                                                   temperature=0.0, ignore_eos=True))
        sets[name] = [Example(pr + o["token_ids"], len(pr) - 1) for pr, o in zip(ids, outs)]
    caches, t0 = {}, time.perf_counter()
    for name, exs in sets.items():
        say(f"trunk pass over {name}: {len(exs)} sequences, weights {engine.weight_format}")
        caches[name] = tapped_cache(model, exs, layers, say)
    trunk_s = time.perf_counter() - t0

    start = load_heads(a.heads or shipped_heads(cfg.fingerprint()), cfg).float()
    ids = start.draft_vocab.cpu()
    unembed = model.unembed_weight().detach().float().cpu()[ids]
    D = a.depth
    arms = {"last": (copy.deepcopy(start), None),
            "fused": (copy.deepcopy(start), Fuse(cfg.hidden_size, len(layers), cfg.rms_norm_eps))}

    def h0_fn(fuse, cache, feats):
        if fuse is None:
            return lambda r: cache.hidden[r]
        return lambda r: fuse([f[r] for f in feats], cache.hidden[r])

    def score(arm: str) -> dict:
        heads, fuse = arms[arm]
        heads.eval()
        res = {}
        for name in ("heldout", "chat16", "humaneval16"):
            cache, feats = caches[name]
            rows, tg = targets_for(cache, list(range(cache.num_seqs)), D, "argmax")
            res[name] = chain_acceptance(h0_fn(fuse, cache, feats), heads, model, cache, rows,
                                         tg, ids, unembed)
        return res

    results: dict = {"layers": layers, "trunk_pass_s": round(trunk_s),
                     "start": score("last")}
    say(f"start: {results['start']}")
    cache, feats = caches["train"]
    rows, tgts = targets_for(cache, list(range(cache.num_seqs)), D, "argmax")
    inputs = chain_inputs(cache, rows, D, "argmax")
    pos = row_positions(cache)[rows]
    weights = torch.tensor([0.8 ** j for j in range(D)])
    steps = math.ceil(len(rows) / a.batch_tokens) * a.epochs
    results.update(train_positions=len(rows), steps=steps)
    for arm, (heads, fuse) in arms.items():
        params = list(heads.parameters()) + (list(fuse.parameters()) if fuse else [])
        for q in params:
            q.requires_grad_(True)
        heads.train()
        opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
        h0_of = h0_fn(fuse, cache, feats)
        g = torch.Generator().manual_seed(0)
        perm = torch.cat([torch.randperm(len(rows), generator=g) for _ in range(a.epochs)])
        t0 = time.perf_counter()
        for step in range(steps):
            lr = a.lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))
            for group in opt.param_groups:
                group["lr"] = lr
            idx = perm[step * a.batch_tokens:(step + 1) * a.batch_tokens]
            r = rows[idx]
            logits = chain_logits(heads, model, h0_of(r), inputs[idx], pos[idx], unembed)
            kl = F.kl_div(F.log_softmax(logits, -1), teacher_probs(cache, r, D, unembed),
                          reduction="none").sum(-1)
            ok = (tgts[idx] >= 0).float()
            loss = (weights * (kl * ok).sum(0) / ok.sum(0).clamp(min=1)).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % 25 == 0 or step + 1 == steps:
                say(f"{arm}: step {step + 1}/{steps} loss {loss.item():.4f} "
                    f"{time.perf_counter() - t0:.0f} s")
        for q in params:
            q.requires_grad_(False)
        results[arm] = score(arm)
        results[f"{arm}_train_s"] = round(time.perf_counter() - t0)
        say(f"{arm}: {results[arm]}")
    print(f"{'arm':8s} " + " ".join(f"{n:>22s}" for n in ("heldout", "chat16", "humaneval16")))
    for arm in ("start", "last", "fused"):
        print(f"{arm:8s} " + " ".join(f"{'/'.join(f'{x:.3f}' for x in results[arm][n]):>22s}"
                                      for n in ("heldout", "chat16", "humaneval16")))
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
