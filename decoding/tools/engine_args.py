"""The engine's command-line flags (`--model`, `--dtype`, `--speculate`, ...) and the
EngineConfig they make.

Shared by `serve` (server/cli.py), `generate` (commands.py) and `bench` (bench/cli.py). Its own
module, below both commands.py and bench/, so that neither imports the other for these flags
(commands.py registers bench; bench only needs the flags).
"""

from __future__ import annotations

import argparse

from ..config import WEIGHT_FORMATS, EngineConfig, SpecConfig


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=None,
                   help="GGUF file or Hugging Face folder (default: embedded SmolLM2-135M-Instruct)")
    g.add_argument("--dtype", default="auto",
                   choices=["auto", "float32", "bfloat16", "float16", "float64"],
                   help="compute dtype (auto: bf16 on GPUs; on CPUs fp32 around int4/int8 "
                        "weights, bf16 for dense weights where the CPU has native bf16)")
    g.add_argument("--weights", default="auto", choices=WEIGHT_FORMATS,
                   help="weight format of the trunk on CPU: dense, or weight-only int8 / int4 "
                        "(group 32: GGUF Q4_0/Q4_1's own blocks); faster, not bit-identical "
                        "to dense (auto: int4 for a Q4_0/Q4_1 GGUF on CPU, else dense)")
    g.add_argument("--no-wide-weights", dest="wide_weights", action="store_false",
                   help="int8/int4 on a CPU with native bf16: do not keep a bf16 copy of the "
                        "quantized weights for passes of 12+ rows (saves 2 bytes per weight; "
                        "prefill and large verify batches then run ~2x slower)")
    g.add_argument("--int4-kernel", default="auto", choices=["auto", "aten", "vnni", "vnni16"],
                   help="int4 on CPU: vnni16 (int16 activations x int4 weights, AVX512-VNNI or "
                        "AVX2, built at first use into ~/.cache/mtpserve/kernels; closest to "
                        "dense), vnni (int8 activations, AVX512-VNNI only: faster, moves greedy "
                        "output more) or aten (PyTorch's, bf16 activations); auto: vnni16 "
                        "where it builds and the CPU has AVX512-VNNI or AVX2, else aten")
    g.add_argument("--attention-kernel", default="auto", choices=["auto", "sdpa", "rows"],
                   help="decode/tree rows' attention: rows (C++ kernel, each row over its own "
                        "keys, batch-invariant by construction; built at first use into "
                        "~/.cache/mtpserve/kernels) or sdpa (PyTorch); auto: rows where it "
                        "builds and the KV cache is on CPU")
    g.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "float32", "float16"],
                   help="the KV cache's dtype: float16 halves its memory and the bytes "
                        "attention reads (arithmetic stays fp32 on CPU); auto: float16 on CPU "
                        "with quantized (int4/int8) weights and the row attention kernel, "
                        "else the model's dtype (fp32 on CPU)")
    g.add_argument("--unembed", default="auto", choices=["auto", "fp32", "fp16", "q8"],
                   help="the logits' weights on CPU: q8 (the GGUF's own Q8_0 values, fp32 "
                        "in/out, ~1 byte per weight, own kernel built at first use), fp16 "
                        "(fp32 in/out, half the bytes, logits within ~0.02) or fp32 (auto: q8 "
                        "where it runs and the file stores Q8_0, else fp16, around int8/int4 "
                        "weights)")
    g.add_argument("--batch-invariant", default="auto", choices=["auto", "on", "off"],
                   help="on: every row of a pass computed as if alone (no wide copy, one "
                        "kernel for every row count, attention per row in a fixed order), so "
                        "greedy output with speculation equals it without and does not depend "
                        "on the other requests in the batch (int4/int8 weights; cost in "
                        "README). auto: on where that costs nothing (CPU defaults: int4 with "
                        "our kernel, the row attention kernel), else off")
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
    g.add_argument("--compile", default="auto", choices=["off", "on", "auto"],
                   help="torch.compile the trunk (inductor, weights frozen into the graph): "
                        "one graph for every row count, compiled at startup (under a minute "
                        "cold on 2 cores, seconds from the cache under ~/.cache/mtpserve/"
                        "inductor); a failed compile serves eagerly. auto (default): on for "
                        "int4/int8 weights on CPU, where it measured faster")
    g.add_argument("--compile-mode", default="max-autotune-no-cudagraphs",
                   choices=["default", "max-autotune-no-cudagraphs"],
                   help="inductor mode (max-autotune: times inductor's own int4 GEMM against "
                        "aten's per shape at the first compile)")
    s = p.add_argument_group("speculation")
    s.add_argument("--speculate", default="auto", choices=["off", "on", "auto"],
                   help="auto sizes trees by batch size; on always drafts; off never")
    s.add_argument("--no-speculate", action="store_true", help="same as --speculate off")
    s.add_argument("--heads", default=None, help="draft heads folder (default: shipped heads)")
    s.add_argument("--proposer", default="hybrid", choices=["heads", "ngram", "hybrid"],
                   help="draft source: heads, prompt lookup (ngram) or both merged")
    s.add_argument("--tree", default="auto",
                   help="draft tree: auto (chosen for these heads on this machine at the first "
                        "start: verify and drafting costs measured once, a few seconds, cached under "
                        "~/.cache/mtpserve/trees), default (the heads' own), a preset (chain2, "
                        "chain4, tree8, tree16) or a JSON choice list")
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
                        wide_weights=a.wide_weights, int4_kernel=a.int4_kernel,
                        attention_kernel=a.attention_kernel, kv_cache_dtype=a.kv_cache_dtype,
                        unembed=a.unembed, device=a.device,
                        batch_invariant=a.batch_invariant,
                        max_num_seqs=a.max_num_seqs, max_model_len=a.max_model_len,
                        kv_cache_memory_gb=a.kv_cache_gb, prefill_chunk_size=a.prefill_chunk,
                        max_tokens_per_step=max(1024, a.prefill_chunk),
                        prefill_while_decoding=a.prefill_while_decoding, seed=a.seed, spec=spec,
                        compile=a.compile,
                        compile_mode=a.compile_mode)
