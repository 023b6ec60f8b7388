"""`mtpserve train-heads --draft-vocab-only`: add (or replace) the draft vocabulary of Medusa
heads already in OUT, without training.

Why a mode of its own: a draft vocabulary is built from the training data and judged on
the held-out split, so heads trained before draft vocabularies existed (or with another
size) can get one from the same data and split, recorded in OUT/heads.json; nothing is
generated and the trunk pass is reused from the hidden cache.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..spec.heads_io import add_draft_vocab, load_heads
from .answer_gen import generate_answers
from .heads_data import Sources
from .hidden_cache import chunk_examples, load_or_cache_hidden, split_sequences, targets_for
from .progress import say_heldout
from .train_config import command_line, generation_options
from .train_medusa import evaluate
from .vocab import build_draft_vocab

if TYPE_CHECKING:
    from ..engine.llm_engine import LLMEngine


def run_draft_vocab_only(a: argparse.Namespace, engine: LLMEngine, src: Sources, out: Path,
                         say: Callable[[str], None]) -> int:
    """Add a draft vocabulary to the heads in OUT, built from the data they were trained on
    (same split: holdout_frac, seed and targets from OUT/heads.json when recorded)."""
    if a.draft_vocab <= 0:
        raise ValueError("--draft-vocab-only needs --draft-vocab N with N > 0")
    if a.head_type != "medusa":
        raise ValueError("--draft-vocab-only re-evaluates Medusa heads; sequential heads "
                         "build their draft vocabulary while training")
    if getattr(a, "trunk_weights", "dense") != "dense":
        raise ValueError("--draft-vocab-only reads the dense trunk's hidden states; "
                         "drop --trunk-weights")
    meta_path = out / "heads.json"
    if not meta_path.exists():
        raise ValueError(f"{meta_path}: no heads to add a draft vocabulary to")
    model = engine.model
    heads = load_heads(out, model.config)
    meta = json.loads(meta_path.read_text())
    tc = meta.get("training", {}).get("config", {})
    holdout = float(tc.get("holdout_frac", a.holdout_frac))
    seed = int(tc.get("seed", a.seed))
    targets = tc.get("targets", a.targets)
    examples = list(src.examples)
    if src.prompts:
        cache_path = Path(a.generated) if a.generated else out / "answers.jsonl"
        answers, _ = generate_answers(engine, src.prompts, cache_path, a.generate_max_tokens,
                                      only_cached=True, **generation_options(a))
        examples += answers
    examples = chunk_examples(examples, a.seq_len)
    hidden_path = Path(a.hidden_cache) if a.hidden_cache else out / "hidden_cache.pt"
    cache, _ = load_or_cache_hidden(model, examples, hidden_path, say)
    train_seqs, hold_seqs = split_sequences(cache.num_seqs, holdout, seed)
    _, tgts = targets_for(cache, train_seqs, heads.num_heads, targets)
    ids, info = build_draft_vocab(cache, train_seqs, tgts, a.draft_vocab, model.config.vocab_size)
    if ids is None:
        raise ValueError(f"a draft vocabulary of {a.draft_vocab} covers the whole vocabulary")
    h_rows, h_tgts = targets_for(cache, hold_seqs, heads.num_heads, targets)
    if len(h_rows):
        full = evaluate(heads, model, cache, h_rows, h_tgts)
        info["heldout"] = evaluate(heads, model, cache, h_rows, h_tgts, vocab_ids=ids)
        info["heldout_full_vocab"] = {k: full[k] for k in ("positions", "top1", "top5")}
        say_heldout(say, full, info["heldout"])
    info["command"] = command_line()
    info["split"] = {"holdout_frac": holdout, "seed": seed, "targets": targets,
                     "train_sequences": len(train_seqs), "heldout_sequences": len(hold_seqs)}
    add_draft_vocab(out, model.config, ids, info)
    say(f"draft vocabulary: {info['size']} tokens ({info['added_by_targets']} added by head "
        f"targets), covers {info['answer_token_coverage']:.4f} of the training answer tokens")
    say(f"wrote {out / 'heads.json'} and {out / 'heads.safetensors'}")
    return 0
