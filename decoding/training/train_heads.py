"""`mtpserve train-heads`: the entry point that prepares the data and dispatches the modes.

Modes: Medusa-1 heads on a frozen trunk (the default, train_medusa.py), a sequential
DeepSeek/EAGLE-style module on a frozen trunk (`--head-type sequential`,
train_sequential.py), heads and trunk trained together (`--joint`, train_joint.py), and
`--draft-vocab-only` (draft_vocab_only.py), which adds a draft vocabulary to heads
already in OUT without training.

Steps (frozen trunk): read sources -> let the model answer prompts (engine, greedy and/or
sampled, speculation off; cached in a JSONL, answer_gen.py; `--generate-only` stops here) -> run the frozen trunk once over every sequence and
cache h_t and the base argmax (hidden_cache.py) -> train the heads over that cache for
several epochs -> evaluate top-1/top-5 on a held-out split over the FULL vocabulary ->
build a draft vocabulary (`--draft-vocab N`, FR-Spec style: the N most frequent answer
tokens of the training split plus every head target seen in training; vocab.py) and
evaluate again restricted to it -> pick a tree (tree_choice.py) -> save in the project
format.

Why this module stands apart: it imports every mode, and nothing imports it back. The
pieces the modes share live in train_config, hidden_cache, vocab, train_loop, progress,
train_medusa (evaluate) and tree_choice, so the imports run one way.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..config import EngineConfig, SpecConfig
from ..engine.llm_engine import LLMEngine
from ..spec.heads_io import load_heads, save_project_heads
from ..spec.mtp_sequential import SequentialMTPHeads
from .draft_vocab_only import run_draft_vocab_only
from .answer_gen import generate_answers
from .heads_data import read_sources
from .hidden_cache import argmax_agreement, chunk_examples, load_or_cache_hidden
from .progress import say_heldout
from .train_config import TrainConfig, command_line, generation_options
from .train_joint import check_joint_args, run_joint
from .train_medusa import train
from .train_sequential import train_sequential
from .tree_choice import choose_tree


def served_engine(a: argparse.Namespace, trunk_engine: LLMEngine, weights: str) -> LLMEngine:
    """The dense trunk itself, or (weights != dense) an engine in the served weight format:
    the answers (--gen-weights) are then what the server would say, the hidden states
    (--trunk-weights) what its heads will read."""
    if weights == "dense":
        return trunk_engine
    return LLMEngine.from_config(EngineConfig(
        model=a.model, device=a.device, weights=weights, max_num_seqs=a.gen_batch,
        max_model_len=2048, compile="auto", spec=SpecConfig(mode="off")))


def run_train_heads(a: argparse.Namespace) -> int:
    """Run `mtpserve train-heads` with its parsed flags (train_config.add_train_args)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    torch.set_num_threads(a.threads)
    cfg = TrainConfig(head_type=a.head_type, num_heads=a.num_heads, num_layers=a.num_layers, epochs=a.epochs, lr=a.lr,
                      batch_tokens=a.batch_tokens, seed=a.seed, checkpoint_every=a.checkpoint_every,
                      holdout_frac=a.holdout_frac, targets=a.targets, vocab=a.vocab,
                      attention=a.module_attention, distill=a.distill,
                      chain_inputs=a.chain_inputs, chain_features=a.chain_features)
    if a.joint or a.max_steps:
        check_joint_args(a)  # before the model loads
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    engine = LLMEngine.from_config(EngineConfig(
        model=a.model, dtype=a.dtype, device=a.device, weights="dense", max_num_seqs=a.gen_batch,
        max_model_len=2048, spec=SpecConfig(mode="off")))
    model = engine.model
    src = read_sources(a.data, engine.tokenizer)
    recipe = {"sources": src.recipe}
    examples = list(src.examples)
    if a.draft_vocab_only:
        return run_draft_vocab_only(a, engine, src, out, say)
    if a.init_heads and cfg.head_type != "sequential":
        raise ValueError("--init-heads is for --head-type sequential")
    if src.prompts:
        cache_path = Path(a.generated) if a.generated else out / "answers.jsonl"
        answers, stats = generate_answers(served_engine(a, engine, a.gen_weights), src.prompts, cache_path, a.generate_max_tokens,
                                          chunk=a.gen_chunk or 4 * a.gen_batch, progress=say,
                                          **generation_options(a))
        examples += answers
        recipe["generation"] = {"cache": str(cache_path), "max_tokens": a.generate_max_tokens,
                                "greedy": a.gen_greedy, "dtype": a.dtype, "weights": a.gen_weights,
                                "max_num_seqs": a.gen_batch,
                                "chat_template": True, **stats}
    if a.generate_only:
        say(f"--generate-only: {recipe.get('generation', {}).get('answer_tokens', 0)} answer "
            "tokens cached; not training")
        return 0
    examples = chunk_examples(examples, a.seq_len)
    if a.joint:
        return run_joint(a, cfg, engine, examples, recipe, out, say, t_all)
    hidden_path = Path(a.hidden_cache) if a.hidden_cache else out / "hidden_cache.pt"
    pass_engine = served_engine(a, engine, a.trunk_weights)
    cache, trunk = load_or_cache_hidden(pass_engine.model, examples, hidden_path, say,
                                        kv_dtype=pass_engine.kv_dtype, trunk=a.trunk_weights)
    del pass_engine
    recipe.update(sequences=cache.num_seqs, positions=int(cache.seq_start[-1]), **argmax_agreement(cache))
    sequential = cfg.head_type == "sequential"
    if sequential:
        init = None
        if a.init_heads:
            init = load_heads(Path(a.init_heads), model.config)
            if not isinstance(init, SequentialMTPHeads) or len(init.mods) != 1:
                raise ValueError(f"--init-heads {a.init_heads}: not one sequential module")
            recipe["init_heads"] = str(a.init_heads)
        heads, report = train_sequential(model, cache, cfg, out, resume=a.resume, progress=say,
                                         draft_vocab=a.draft_vocab, init=init)
    else:
        heads, report = train(model, cache, cfg, out, resume=a.resume, progress=say,
                              draft_vocab=a.draft_vocab)
    tree_info: dict = {}
    if "heldout" in report:
        # The tree is calibrated on what drafting will propose: the draft vocabulary's
        # accuracies when there is one.
        ranks = report.get("draft_vocab", {}).get("heldout", report["heldout"])["rank_acc"]
        best, tree_info = choose_tree(ranks, out, chain_only=sequential, topk=heads.topk)
        heads.default_tree = best
    method = (f"sequential (DeepSeek-style module, one for all depths, {cfg.attention} "
              "attention) " if sequential else "medusa-1 ")
    training = {
        "command": command_line(),
        "method": method + "self-distillation: frozen trunk, shared frozen unembedding, "
                  f"targets={cfg.targets}"
                  + (f", distill={cfg.distill}, chain_inputs={cfg.chain_inputs}, "
                     f"chain_features={cfg.chain_features}" if sequential else ""),
        "base_model": engine.model_name, "config": asdict(cfg), "data": recipe,
        "trunk_pass": trunk, "total_seconds_this_run": round(time.perf_counter() - t_all, 1),
        "torch": torch.__version__, "tree": tree_info, **report,
    }
    save_project_heads(heads, out, model.config, training=training)
    ho = report.get("heldout")
    if ho:
        say_heldout(say, ho, report.get("draft_vocab", {}).get("heldout"))
        say(f"default tree: {heads.default_tree} (expected accepted drafts per step: "
            f"{tree_info['expected_accepted_drafts']})")
    if "draft_vocab" in report:
        say(f"draft vocabulary: {report['draft_vocab']['size']} tokens")
    say(f"wrote {out / 'heads.json'} and {out / 'heads.safetensors'}")
    return 0

