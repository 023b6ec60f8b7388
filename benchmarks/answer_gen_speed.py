"""Answer-generation speed of `train-heads` (answer_gen.py) at several batch sizes, to size
the #24 data run (~1.5M answer tokens): tokens/s of the engine answering prompt_set.jsonl
prompts, speculation off, fp32 by default as train-heads answers, continuous batching with
`--gen-batch` sequences running and as many queued (`--gen-chunk`).

Small by design (the default 32 prompts x 64 tokens per batch size): a rate, not a run.

    .venv/bin/python benchmarks/answer_gen_speed.py --batches 32 64 --prompts 32 --max-tokens 64
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[1] / "decoding" / "training" / "data" / "prompt_set.jsonl"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[32, 64])
    p.add_argument("--prompts", type=int, default=32, help="first N prompts of --data")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--samples", type=int, default=0, help="sampled answers per prompt (T=0.7)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--model", default=None)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from mtpserve.decoding.config import EngineConfig, SpecConfig
    from mtpserve.decoding.engine.llm_engine import LLMEngine
    from mtpserve.decoding.training.answer_gen import generate_answers
    from mtpserve.decoding.training.heads_data import read_sources

    rows = []
    for b in a.batches:
        engine = LLMEngine.from_config(EngineConfig(
            model=a.model, dtype=a.dtype, device="cpu", weights="dense", max_num_seqs=b,
            max_model_len=1024, spec=SpecConfig(mode="off")))
        src = read_sources([a.data], engine.tokenizer)
        prompts = src.prompts[:a.prompts]
        with tempfile.TemporaryDirectory() as tmp:
            _, st = generate_answers(engine, prompts, Path(tmp) / "a.jsonl", a.max_tokens,
                                     chunk=2 * b, samples=a.samples, progress=lambda m: None)
        rows.append({"batch": b, "answers": st["answers"], "tokens": st["generated_tokens_now"],
                     "seconds": st["generation_seconds"], "tok_s": st["tokens_per_second_now"]})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        del engine
    print(f"{'batch':>6} {'answers':>8} {'tokens':>7} {'seconds':>8} {'tok/s':>7}")
    for r in rows:
        print(f"{r['batch']:>6} {r['answers']:>8} {r['tokens']:>7} {r['seconds']:>8} {r['tok_s']:>7}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
