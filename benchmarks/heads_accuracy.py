"""Per-head top-1/top-5 of draft heads on prompts they were never trained on.

The base model answers the prompts greedily (fp32, speculation off; answers cached in a
JSONL so reruns generate nothing), the trunk runs once over prompt+answer, and every
answer position is scored exactly like train-heads' held-out report: head k at position t
must rank the base model's own greedy choice at t+k (argmax targets). Each heads folder is
scored over the full vocabulary and, when it has one (or --draft-vocab-from names a
folder that has), restricted to its draft vocabulary.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/heads_accuracy.py \\
        --prompts decoding/training/data/heldout_chat_prompts.jsonl \\
        --answers /tmp/heldout_answers.jsonl \\
        benchmarks/heads/smollm2-135m-medusa4 benchmarks/heads/smollm2-135m-medusa4-r2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("heads", nargs="+", help="heads folders")
    p.add_argument("--prompts", default="decoding/training/data/heldout_chat_prompts.jsonl")
    p.add_argument("--answers", required=True, help="JSONL cache of the base model's answers")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--model", default=None, help="GGUF file or HF folder (default: embedded)")
    p.add_argument("--draft-vocab-from", default=None,
                   help="also score every folder with this folder's draft vocabulary")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    from mtpserve.decoding.config import EngineConfig, SpecConfig
    from mtpserve.decoding.engine.llm_engine import LLMEngine
    from mtpserve.decoding.spec.heads_io import load_heads
    from mtpserve.decoding.training.answer_gen import generate_answers
    from mtpserve.decoding.training.heads_data import read_sources
    from mtpserve.decoding.training.hidden_cache import cache_hidden, chunk_examples, targets_for
    from mtpserve.decoding.training.train_medusa import evaluate

    engine = LLMEngine.from_config(EngineConfig(
        model=a.model, dtype="float32", device="cpu", weights="dense", max_num_seqs=8,
        max_model_len=2048, spec=SpecConfig(mode="off")))
    model = engine.model
    src = read_sources([a.prompts], engine.tokenizer)
    answers, stats = generate_answers(engine, src.prompts, Path(a.answers), a.max_tokens)
    print(f"{stats['answers']} answers, {stats['answer_tokens']} tokens "
          f"({stats['answers_generated_now']} generated now)", file=sys.stderr)
    cache = cache_hidden(model, chunk_examples(src.examples + answers, 1024))
    extra = None
    if a.draft_vocab_from:
        extra = load_heads(a.draft_vocab_from, model.config).draft_vocab
        if extra is None:
            raise SystemExit(f"{a.draft_vocab_from}: has no draft vocabulary")
    results = {}
    for folder in a.heads:
        heads = load_heads(folder, model.config).float().eval()
        rows, tgts = targets_for(cache, list(range(cache.num_seqs)), heads.num_heads, "argmax")
        res = {"full": evaluate(heads, model, cache, rows, tgts)}
        if heads.draft_vocab is not None:
            res["own_draft_vocab"] = evaluate(heads, model, cache, rows, tgts,
                                              vocab_ids=heads.draft_vocab)
        own = heads.draft_vocab
        if extra is not None and (own is None or not torch.equal(extra, own)):
            res["draft_vocab_from"] = evaluate(heads, model, cache, rows, tgts, vocab_ids=extra)
        results[folder] = res
        for name, r in res.items():
            vocab = f"{r['vocab']} ids" if "vocab" in r else "full"
            print(f"{folder} [{name}, {vocab}] positions {r['positions']}")
            for k in range(heads.num_heads):
                inside = f"  targets inside {r['in_vocab'][k]:.4f}" if "in_vocab" in r else ""
                print(f"  head {k + 1}: top-1 {r['top1'][k]:.4f} top-5 {r['top5'][k]:.4f}{inside}")
    if a.json:
        Path(a.json).write_text(json.dumps({"prompts": a.prompts, "generation": stats,
                                            "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
