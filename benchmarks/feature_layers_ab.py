"""Do more trunk layers' features, or a second block, make the sequential module draft
better? (EAGLE-3's fused features; the issue's "second block")

EAGLE-3 feeds its draft module a projection of low, middle and high layers' hidden states
instead of the last one alone. This script measures that, and a module twice as deep, on
our data before any engine change: every arm starts from the same module weights (the
shipped heads by default) and continues training on the same positions in the same order,
same steps and learning rate:
  last    h0 = the trunk's final-normed h_t (what the engine feeds today)
  fused   h0 = fc(cat[norm(x_low), norm(x_mid), h_t]), x_i the residual stream after
          layer i; fc starts as [0 | 0 | I], so the arm starts exactly where `last` does
  block2  h0 = h_t, and a second decoder block after the module's own, started as the
          identity (the trunk's last layer with its output projections zeroed, as
          train-heads starts a module)
Scored on held-out Magpie prompts (split by prompt as train-heads splits) and on prompts
from outside the training set (chat16, HumanEval; greedy answers of the served engine):
P(the top-1 chain's first d drafts all equal the trunk's greedy tokens), the timing-free
acceptance `benchmarks/chain_acceptance.py` reports.

    .venv/bin/python benchmarks/feature_layers_ab.py --data magpie12k.jsonl \\
        --generated magpie12k_answers.jsonl --train-seqs 1500

Sampled answers as training data (#24): with --sampled (a train-heads cache holding one
answer at --sample-temperature per training prompt: `--gen-samples 1 --no-gen-greedy`) two
more arms train the `last` module the same steps from the same start:
  sampled  on the training prompts' sampled answers instead of their greedy ones
  mixed    each batch half greedy positions, half sampled ones
On sampled text the trunk's greedy token is not the next one, so those positions' chain
reads the data's tokens (train-heads --chain-inputs data), its targets and KL teachers
staying the trunk's argmax and softmax after each of them. A fourth score, chat16_t0.7,
takes chat16's answers sampled at that temperature (what serving at T=0.7 drafts after)
and asks the same: do the first d drafts, the chain reading the sampled tokens, all equal
the trunk's argmax there? --steps fixes every arm's step count (default: the greedy
set's one epoch).

    .venv/bin/python benchmarks/feature_layers_ab.py --data magpie12k.jsonl \\
        --generated magpie12k_answers.jsonl --train-seqs 1500 --arms sampled,last,mixed \\
        --sampled train1500_t0.7.jsonl
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


class TwoBlocks(nn.Module):
    """The module's block, then a second one (its own layer index in the chain's cache)."""

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x, rot, meta, kv):
        return self.second(self.first(x, rot, meta, kv), rot, meta, kv)


def with_second_block(heads, cfg):
    """A copy of `heads` whose module runs a second block, started as the identity."""
    from mtpserve.decoding.config import EngineConfig, SpecConfig
    from mtpserve.decoding.engine.engine_setup import load_model
    from mtpserve.decoding.model.trunk import DecoderLayer
    from mtpserve.decoding.training.train_sequential import init_from_trunk
    # the dense trunk: the quantized one keeps no dense copy of its last layer
    model = load_model(EngineConfig(weights="dense", dtype="float32",
                                    spec=SpecConfig(mode="off"))).model
    donor = copy.deepcopy(heads)
    init_from_trunk(donor, model, seed=1)  # the identity start's block: last layer, zeroed out
    second = DecoderLayer(cfg, 1)
    second.load_state_dict(donor.mods[0].block.state_dict())
    out = copy.deepcopy(heads)
    out.mods[0].block = TwoBlocks(out.mods[0].block, second)
    return out


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


def chain_acceptance(h0_of, heads, model, cache, rows, tgts, ids, unembed, batch=512,
                     inputs="argmax"):
    """P(first d top-1 drafts right) for d = 1..D, drafting in the draft vocabulary; the
    chain reads the trunk's greedy tokens (argmax) or the data's (data: sampled text)."""
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
            lg = chain_logits(heads, model, h0_of(r), chain_inputs(cache, r, D, inputs),
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
    p.add_argument("--arms", default="last,fused",
                   help="of last, fused, block2 (greedy answers); sampled, mixed (--sampled)")
    p.add_argument("--sampled", default=None,
                   help="cached sampled answers of the training prompts (one per prompt)")
    p.add_argument("--sample-temperature", type=float, default=0.7)
    p.add_argument("--sample-seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None,
                   help="training steps of every arm (default: --epochs over the greedy set)")
    p.add_argument("--sampled-features", default=None,
                   help="as --features, for the sampled sets")
    p.add_argument("--features", default=None,
                   help="keep the trunk passes' features in this file and reuse them")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args(argv)
    arm_names = a.arms.split(",")
    if not a.sampled and {"sampled", "mixed"} & set(arm_names):
        p.error("the sampled and mixed arms need --sampled")
    if a.sampled and "fused" in arm_names:
        p.error("--sampled: the sampled sets keep no fused features")
    torch.set_num_threads(a.threads)
    say = lambda m: print(m, file=sys.stderr, flush=True)

    from mtpserve.decoding.config import EngineConfig, SamplingParams, SpecConfig
    from mtpserve.decoding.engine.llm_engine import LLMEngine
    from mtpserve.decoding.spec.heads_io import load_heads, shipped_heads
    from mtpserve.decoding.tools.bench.prompts import encode_prompts, load_prompts
    from mtpserve.decoding.training.answer_gen import generate_answers
    from mtpserve.decoding.training.heads_data import Example, read_sources
    from mtpserve.decoding.training.hidden_cache import (
        cache_hidden,
        split_sequences,
        targets_for,
    )
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
    sampled_sets = {}
    if a.sampled:
        sampled_sets["train_sampled"], _ = generate_answers(
            engine, [src.prompts[i] for i in train], Path(a.sampled), 256, greedy=False,
            samples=1, temperature=a.sample_temperature, seed=a.sample_seed, only_cached=True)
    for name, file in (("chat16", "benchmarks/prompts/chat16.jsonl"), ("humaneval16", None)):
        _, prompts = load_prompts(file, 16)
        ids = encode_prompts(engine.tokenizer, prompts)
        outs = engine.generate(ids, SamplingParams(max_tokens=a.unseen_max_tokens,
                                                   temperature=0.0, ignore_eos=True))
        sets[name] = [Example(pr + o["token_ids"], len(pr) - 1) for pr, o in zip(ids, outs)]
        if a.sampled and name == "chat16":
            outs = engine.generate(ids, SamplingParams(
                max_tokens=a.unseen_max_tokens, temperature=a.sample_temperature,
                seed=a.sample_seed, ignore_eos=True))
            sampled_sets[f"chat16_t{a.sample_temperature:g}"] = [
                Example(pr + o["token_ids"], len(pr) - 1) for pr, o in zip(ids, outs)]
    caches, t0 = {}, time.perf_counter()
    tag = [layers, a.train_seqs, a.holdout_frac, a.unseen_max_tokens, engine.weight_format]
    saved = (torch.load(a.features, weights_only=False)
             if a.features and Path(a.features).exists() else {})
    if saved.get("tag") == tag:
        caches = saved["caches"]
        say(f"features: reusing {a.features}")
    else:
        for name, exs in sets.items():
            say(f"trunk pass over {name}: {len(exs)} sequences, weights {engine.weight_format}")
            caches[name] = tapped_cache(model, exs, layers, say)
        if a.features:
            torch.save({"tag": tag, "caches": caches}, a.features)
    if sampled_sets:  # no fused features: the sampled arms feed h_t
        stag = [a.train_seqs, a.holdout_frac, a.unseen_max_tokens, engine.weight_format,
                str(a.sampled), a.sample_temperature, a.sample_seed]
        saved = (torch.load(a.sampled_features, weights_only=False)
                 if a.sampled_features and Path(a.sampled_features).exists() else {})
        if saved.get("tag") == stag:
            caches.update(saved["caches"])
            say(f"sampled features: reusing {a.sampled_features}")
        else:
            scaches = {}
            for name, exs in sampled_sets.items():
                say(f"trunk pass over {name}: {len(exs)} sequences, weights {engine.weight_format}")
                scaches[name] = (cache_hidden(model, exs, progress=say), [])
            if a.sampled_features:
                torch.save({"tag": stag, "caches": scaches}, a.sampled_features)
            caches.update(scaches)
    trunk_s = time.perf_counter() - t0

    start = load_heads(a.heads or shipped_heads(cfg.fingerprint()), cfg).float()
    ids = start.draft_vocab.cpu()
    unembed = model.unembed_weight().detach().float().cpu()[ids]
    D = a.depth
    makers = {"last": lambda: (copy.deepcopy(start), None),
              "fused": lambda: (copy.deepcopy(start),
                                Fuse(cfg.hidden_size, len(layers), cfg.rms_norm_eps)),
              "block2": lambda: (with_second_block(start, cfg), None),
              "sampled": lambda: (copy.deepcopy(start), None),
              "mixed": lambda: (copy.deepcopy(start), None)}
    arms = {name: makers[name]() for name in arm_names}

    def h0_fn(fuse, cache, feats):
        if fuse is None:
            return lambda r: cache.hidden[r]
        return lambda r: fuse([f[r] for f in feats], cache.hidden[r])

    scored = ["heldout", "chat16", "humaneval16"] + [n for n in sampled_sets if n != "train_sampled"]

    def score(heads, fuse) -> dict:
        heads.eval()
        res = {}
        for name in scored:
            cache, feats = caches[name]
            rows, tg = targets_for(cache, list(range(cache.num_seqs)), D, "argmax")
            res[name] = chain_acceptance(h0_fn(fuse, cache, feats), heads, model, cache, rows,
                                         tg, ids, unembed,
                                         inputs="data" if name in sampled_sets else "argmax")
        return res

    results: dict = {"layers": layers, "trunk_pass_s": round(trunk_s),
                     "start": score(start, None)}
    say(f"start: {results['start']}")

    def source(name, mode):
        """A training set's positions: (cache, feats, rows, targets, chain inputs, positions)."""
        cache, feats = caches[name]
        rows, tgts = targets_for(cache, list(range(cache.num_seqs)), D, "argmax")
        return (cache, feats, rows, tgts, chain_inputs(cache, rows, D, mode),
                row_positions(cache)[rows])

    greedy = source("train", "argmax")
    sampled = source("train_sampled", "data") if a.sampled else None
    arm_data = {arm: [sampled] if arm == "sampled" else [greedy, sampled] if arm == "mixed"
                else [greedy] for arm in arms}
    weights = torch.tensor([0.8 ** j for j in range(D)])
    steps = a.steps or math.ceil(len(greedy[2]) / a.batch_tokens) * a.epochs
    results.update(train_positions=len(greedy[2]), steps=steps)
    if sampled:
        results["train_positions_sampled"] = len(sampled[2])
    for arm, (heads, fuse) in arms.items():
        params = list(heads.parameters()) + (list(fuse.parameters()) if fuse else [])
        for q in params:
            q.requires_grad_(True)
        heads.train()
        opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
        data = arm_data[arm]
        per = a.batch_tokens // len(data)  # each source's share of a batch
        g = torch.Generator().manual_seed(0)
        perms = [torch.cat([torch.randperm(len(d[2]), generator=g)
                            for _ in range(max(a.epochs, math.ceil(steps * per / len(d[2]))))])
                 for d in data]
        t0 = time.perf_counter()
        for step in range(steps):
            lr = a.lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))
            for group in opt.param_groups:
                group["lr"] = lr
            h0, inp, ps, teach, tg = [], [], [], [], []
            for (cache, feats, rows, tgts, inputs, pos), perm in zip(data, perms):
                idx = perm[step * per:(step + 1) * per]
                r = rows[idx]
                h0.append(h0_fn(fuse, cache, feats)(r))
                inp.append(inputs[idx])
                ps.append(pos[idx])
                teach.append(teacher_probs(cache, r, D, unembed))
                tg.append(tgts[idx])
            logits = chain_logits(heads, model, torch.cat(h0), torch.cat(inp), torch.cat(ps),
                                  unembed)
            kl = F.kl_div(F.log_softmax(logits, -1), torch.cat(teach),
                          reduction="none").sum(-1)
            ok = (torch.cat(tg) >= 0).float()
            loss = (weights * (kl * ok).sum(0) / ok.sum(0).clamp(min=1)).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % 25 == 0 or step + 1 == steps:
                say(f"{arm}: step {step + 1}/{steps} loss {loss.item():.4f} "
                    f"{time.perf_counter() - t0:.0f} s")
        for q in params:
            q.requires_grad_(False)
        results[arm] = score(heads, fuse)
        results[f"{arm}_train_s"] = round(time.perf_counter() - t0)
        say(f"{arm}: {results[arm]}")
        if a.out:  # after every arm: a cut-short run keeps what it measured
            Path(a.out).write_text(json.dumps(results, indent=1))
    print(f"{'arm':8s} " + " ".join(f"{n:>22s}" for n in scored))
    for arm in ["start", *arms]:
        print(f"{arm:8s} " + " ".join(f"{'/'.join(f'{x:.3f}' for x in results[arm][n]):>22s}"
                                      for n in scored))
    return 0


if __name__ == "__main__":
    sys.exit(main())
