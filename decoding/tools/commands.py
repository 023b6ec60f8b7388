"""Offline subcommands (generate, bench, train-heads, inspect, export-model, export-heads) and
the shared engine flags.

The only place in decoding/ that reads flags or environment variables.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from ..config import EngineConfig, SamplingParams, SpecConfig


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=None,
                   help="GGUF file or Hugging Face folder (default: embedded SmolLM2-135M-Instruct)")
    g.add_argument("--dtype", default="auto",
                   choices=["auto", "float32", "bfloat16", "float16", "float64"],
                   help="compute dtype (auto: bf16 on GPUs; on CPUs fp32 around int4/int8 "
                        "weights, bf16 for dense weights where the CPU has native bf16)")
    g.add_argument("--weights", default="auto", choices=["auto", "dense", "int8", "int4"],
                   help="weight format of the trunk on CPU: dense, or weight-only int8 / int4 "
                        "(group 32: GGUF Q4_0/Q4_1's own blocks); faster, not bit-identical "
                        "to dense (auto: int4 for a Q4_0/Q4_1 GGUF on CPU, else dense)")
    g.add_argument("--no-wide-weights", dest="wide_weights", action="store_false",
                   help="int8/int4 on a CPU with native bf16: do not keep a bf16 copy of the "
                        "quantized weights for passes of 12+ rows (saves 2 bytes per weight; "
                        "prefill and large verify batches then run ~2x slower)")
    g.add_argument("--unembed", default="auto", choices=["auto", "fp32", "fp16"],
                   help="the logits' weights on CPU: fp16 (fp32 in/out, half the bytes, logits "
                        "within ~0.02) or fp32 (auto: fp16 around int8/int4 weights)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--max-num-seqs", type=int, default=16, help="sequences decoded together")
    g.add_argument("--max-model-len", type=int, default=2048, help="context per sequence")
    g.add_argument("--kv-cache-gb", type=float, default=0.0,
                   help="KV cache budget in GiB (0: max-num-seqs x max-model-len)")
    g.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens per sequence per step")
    g.add_argument("--prefill-while-decoding", type=int, default=512,
                   help="prompt tokens a step may add while sequences decode: bounds how long "
                        "a burst of prompts stalls running streams")
    g.add_argument("--seed", type=int, default=0, help="engine seed for unseeded requests")
    s = p.add_argument_group("speculation")
    s.add_argument("--speculate", default="auto", choices=["off", "on", "auto"],
                   help="auto sizes trees by batch size; on always drafts; off never")
    s.add_argument("--no-speculate", action="store_true", help="same as --speculate off")
    s.add_argument("--heads", default=None, help="draft heads folder (default: shipped heads)")
    s.add_argument("--proposer", default="hybrid", choices=["heads", "ngram", "hybrid"],
                   help="draft source: heads, prompt lookup (ngram) or both merged")
    s.add_argument("--tree", default="auto", help="tree preset (chain2, chain4, tree8, tree16) or JSON file")
    s.add_argument("--acceptance", default="typical", choices=["greedy", "typical", "rejection"],
                   help="rule for sampled requests (temperature 0 is always greedy)")
    s.add_argument("--typical-epsilon", type=float, default=0.09)
    s.add_argument("--typical-delta", type=float, default=0.3)


def engine_config_from_args(a: argparse.Namespace) -> EngineConfig:
    spec = SpecConfig(
        mode="off" if a.no_speculate else a.speculate,
        heads_path=a.heads,
        proposer=a.proposer,
        tree=a.tree,
        default_acceptance=a.acceptance,
        typical_epsilon=a.typical_epsilon,
        typical_delta=a.typical_delta,
    )
    return EngineConfig(model=a.model, dtype=a.dtype, weights=a.weights,
                        wide_weights=a.wide_weights, unembed=a.unembed, device=a.device,
                        max_num_seqs=a.max_num_seqs, max_model_len=a.max_model_len,
                        kv_cache_memory_gb=a.kv_cache_gb, prefill_chunk_size=a.prefill_chunk,
                        max_tokens_per_step=max(1024, a.prefill_chunk),
                        prefill_while_decoding=a.prefill_while_decoding, seed=a.seed, spec=spec)


# -- generate ---------------------------------------------------------------------------
def _run_generate(a: argparse.Namespace) -> int:
    from ..engine.llm_engine import LLMEngine

    engine = LLMEngine.from_config(engine_config_from_args(a))
    tok = engine.tokenizer
    prompts = [tok.encode_chat([{"role": "user", "content": p}]) if a.chat else tok.encode(p)
               for p in a.prompts]
    params = SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, seed=a.seed_request,
                            top_p=a.top_p, stop=tuple(a.stop or ()))
    t0 = time.perf_counter()
    results = engine.generate(prompts, params)
    wall = time.perf_counter() - t0
    for prompt, r in zip(a.prompts, results):
        spec = r["spec"]
        n = len(r["token_ids"])
        if a.json:
            print(json.dumps({
                "prompt": prompt, "text": r["text"], "token_ids": r["token_ids"],
                "finish_reason": r["finish_reason"], "steps": spec.num_steps,
                "tokens_per_s": n / r["seconds"] if r["seconds"] else None,
                "speculative_decoding": spec.to_dict(),
            }))
        else:
            print(r["text"])
            print(f"-- {n} tokens, {spec.num_steps} steps, "
                  f"{spec.mean_acceptance_length:.2f} tokens/step, "
                  f"{n / r['seconds']:.1f} tok/s, finish={r['finish_reason']}", file=sys.stderr)
    if not a.json:
        print(f"-- total {wall:.2f} s", file=sys.stderr)
    return 0


# -- inspect ----------------------------------------------------------------------------
def _run_inspect(a: argparse.Namespace) -> int:
    from ..model.checkpoint import load_checkpoint
    from ..spec.heads import load_heads

    ck = load_checkpoint(a.model)
    n_params = sum(t.numel() for t in ck.tensors.values())
    info = {"name": ck.name, "path": ck.path, "parameters": n_params,
            "fingerprint": ck.config.fingerprint(), "config": ck.config.to_dict(),
            "tokenizer": {"vocab_size": ck.tokenizer.vocab_size,
                          "bos": ck.tokenizer.bos_token_id,
                          "eos": list(ck.tokenizer.eos_token_ids)}}
    if a.heads:
        h = load_heads(a.heads, ck.config)
        info["heads"] = {"type": getattr(h, "kind", "medusa"), "num_heads": h.num_heads,
                         "num_layers": getattr(h, "num_layers", 1),
                         "default_tree": h.default_tree}
    print(json.dumps(info, indent=2, default=str))
    return 0


def _run_bench(a: argparse.Namespace) -> int:
    from .bench import run_bench

    return run_bench(a)


def _run_train_heads(a: argparse.Namespace) -> int:
    from ..training.train_heads import run_train_heads

    return run_train_heads(a)


def register_offline_commands(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="offline generation for prompts given on the command line")
    g.add_argument("prompts", nargs="+", help="prompt texts")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed-request", type=int, default=None, help="sampling seed")
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--chat", action="store_true", help="wrap each prompt as a chat user message")
    g.add_argument("--json", action="store_true", help="one JSON object per prompt")
    add_engine_args(g)
    g.set_defaults(func=_run_generate)

    b = sub.add_parser("bench", help="offline benchmark: tokens/s, ms/step, speculation on vs off, "
                                     "vs transformers; prints a table, writes JSON")
    from .bench import add_bench_args

    add_bench_args(b)
    add_engine_args(b)
    b.set_defaults(func=_run_bench)

    t = sub.add_parser("train-heads", help="train Medusa draft heads by self-distillation")
    from ..training.train_heads import add_train_args

    add_train_args(t)
    t.set_defaults(func=_run_train_heads)

    i = sub.add_parser("inspect", help="print a checkpoint's config, tokenizer and heads")
    i.add_argument("--model", default=None, help="GGUF file or HF folder (default: embedded)")
    i.add_argument("--heads", default=None, help="heads folder to check against the model")
    i.set_defaults(func=_run_inspect)

    # -- exports for other engines (decoding/tools/export.py): export-model, export-heads --------
    from .export import add_export_commands

    add_export_commands(sub)
