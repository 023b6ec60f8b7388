"""Configuration dataclasses. Checked at construction; only the CLI reads flags/env."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Literal, get_args

AcceptanceRule = Literal["greedy", "typical", "rejection"]
SpeculateMode = Literal["off", "on", "auto"]
DTypeName = Literal["auto", "float32", "bfloat16", "float16", "float64"]
WeightFormat = Literal["auto", "dense", "int8", "int4"]  # EngineConfig.weights
WEIGHT_FORMATS: tuple[str, ...] = get_args(WeightFormat)  # for CLI choices and checks


@dataclass(slots=True)
class ModelConfig:
    """Shape and numerics of a Llama-family trunk (Llama, Mistral, Qwen2/3, SmolLM)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0  # 0: hidden_size // num_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3"|"linear", ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # Qwen2: bias on q/k/v
    qk_norm: bool = False  # Qwen3: RMSNorm on q and k per head
    architecture: str = "llama"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            if self.num_heads <= 0 or self.hidden_size % self.num_heads:
                raise ValueError(
                    f"hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}"
                )
            self.head_dim = self.hidden_size // self.num_heads
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} not a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("llama3", "linear", "default", None):
                raise ValueError(f"unsupported rope_scaling type {kind!r}")
        self.eos_token_ids = tuple(self.eos_token_ids)

    def fingerprint(self) -> str:
        """Short hash of the shape fields; heads record it to refuse a foreign base model."""
        keys = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                "num_kv_heads", "head_dim", "architecture")
        blob = json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(slots=True)
class SpecConfig:
    """How the engine drafts: which proposer, which tree, when to speculate."""

    mode: SpeculateMode = "auto"
    heads_path: str | None = None  # None: shipped heads for the model if any
    proposer: Literal["heads", "ngram", "hybrid"] = "hybrid"
    # preset name, path to a JSON choice list, "default" (the heads' own default tree) or
    # "auto" (calibrated on this machine at the first start where the heads carry held-out
    # accuracies, engine/tree_autotune.py; else the heads' default)
    tree: str = "auto"
    ngram_max: int = 3
    ngram_min: int = 1
    ngram_draft_len: int = 4
    default_acceptance: AcceptanceRule = "typical"
    typical_epsilon: float = 0.09
    typical_delta: float = 0.3

    def __post_init__(self) -> None:
        if self.mode not in ("off", "on", "auto"):
            raise ValueError(f"speculate mode must be off|on|auto, got {self.mode!r}")
        if self.proposer not in ("heads", "ngram", "hybrid"):
            raise ValueError(f"proposer must be heads|ngram|hybrid, got {self.proposer!r}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError("need 1 <= ngram_min <= ngram_max")
        if self.ngram_draft_len < 1:
            raise ValueError("ngram_draft_len must be >= 1")
        if self.default_acceptance not in ("greedy", "typical", "rejection"):
            raise ValueError(f"unknown acceptance rule {self.default_acceptance!r}")


@dataclass(slots=True)
class EngineConfig:
    model: str | None = None  # path to a GGUF file or HF folder; None: embedded default
    dtype: DTypeName = "auto"
    weights: WeightFormat = "auto"  # weight-only quantization (CPU)
    # int8/int4 on CPUs with native bf16: also keep bf16 copies for passes of many rows
    wide_weights: bool = True
    # int4's CPU kernel: aten (PyTorch's, bf16 activations), vnni16 (int16 activations x int4
    # weights, model/int4_vnni.py: AVX512-VNNI, or AVX2+FMA+F16C with the same bits) or vnni
    # (int8 activations, AVX512-VNNI only); auto: vnni16 where it builds and runs, else
    # aten. CUDA keeps PyTorch's kernels. vnni16 matched the dense fp32 reference on 16/16
    # greedy HumanEval outputs (aten 8/16, vnni 3/16) and is faster than aten (batch-1
    # decode 15.0 vs 22.2 ms/step; docs/benchmarks.md section 6).
    int4_kernel: Literal["auto", "aten", "vnni", "vnni16"] = "auto"
    # A row's result does not depend on the other rows of the pass (trees, other
    # sequences): greedy output with speculation equals it without, and a request's greedy
    # output does not depend on the batch. auto: on where it costs nothing (model/
    # batch_invariance.py: the row attention kernel, quantized layers without a bf16 wide
    # copy, i.e. today's CPU defaults), else off. True/False mean on/off.
    # Costs: see README (Batch invariance).
    batch_invariant: Literal["auto", "on", "off"] = "auto"
    # attention of decode and tree rows: rows (model/row_attention.py: a C++ kernel, one
    # (row, KV head) at a time over the row's own keys, batch-invariant by construction, so
    # --batch-invariant on costs attention nothing) or sdpa (PyTorch's SDPA; attend_invariant
    # with --batch-invariant on); auto: rows where it builds (fp32/fp16 KV cache on CPU), else sdpa
    attention_kernel: Literal["auto", "sdpa", "rows"] = "auto"
    # the trunk's KV cache: float16 halves its bytes (attention reads every cached key of
    # every sequence each step); arithmetic stays fp32 on CPU (the row kernel widens fp16 as
    # it reads, prefill's SDPA upcasts). auto: see device.kv_cache_dtype
    kv_cache_dtype: Literal["auto", "float32", "float16"] = "auto"
    # logits on CPU: q8 (the GGUF's own Q8_0 blocks, model/q8_unembed.py: exact weight
    # values times int16-quantized activations, fp32 out, ~1 byte per weight), fp16
    # (FBGEMM, fp32 in/out, half the bytes) or fp32 (dense, as the file's values); auto:
    # q8 else fp16 around an int8/int4 trunk, fp32 for dense weights
    unembed: Literal["auto", "fp32", "fp16", "q8"] = "auto"
    device: str = "auto"  # auto|cpu|cuda|cuda:N
    max_num_seqs: int = 16
    max_model_len: int = 2048  # per-sequence context (prompt + output + tree)
    kv_cache_memory_gb: float = 0.0  # 0: enough for max_num_seqs * max_model_len
    prefill_chunk_size: int = 256  # prompt tokens per sequence per step
    max_tokens_per_step: int = 1024  # all sequences together
    # ... of which prompt tokens while any sequence decodes: bounds a burst's stall of
    # running streams (benchmarks/burst.py: 1130 -> 543 ms per step, same burst TTFT)
    prefill_while_decoding: int = 512
    seed: int = 0
    spec: SpecConfig = field(default_factory=SpecConfig)
    # torch.compile the trunk's forward (model/compiled.py): one graph for every row count,
    # compiled at startup. auto: on where docs/benchmarks.md shows it faster (CPU,
    # int4/int8 weights), else off.
    compile: Literal["off", "on", "auto"] = "off"
    # max-autotune: inductor times its own C++ int4 micro-GEMM against aten's per shape
    compile_mode: Literal["default", "max-autotune-no-cudagraphs"] = "max-autotune-no-cudagraphs"

    def __post_init__(self) -> None:
        if self.compile not in ("off", "on", "auto"):
            raise ValueError(f"compile must be off|on|auto, got {self.compile!r}")
        if self.compile_mode not in ("default", "max-autotune-no-cudagraphs"):
            raise ValueError(f"unknown compile mode {self.compile_mode!r}")
        if isinstance(self.batch_invariant, bool):
            self.batch_invariant = "on" if self.batch_invariant else "off"
        if self.batch_invariant not in ("auto", "on", "off"):
            raise ValueError(f"batch_invariant must be auto|on|off, got {self.batch_invariant!r}")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.weights not in WEIGHT_FORMATS:
            raise ValueError(f"weights must be auto|dense|int8|int4, got {self.weights!r}")
        if self.int4_kernel not in ("auto", "aten", "vnni", "vnni16"):
            raise ValueError(f"int4_kernel must be auto|aten|vnni|vnni16, got {self.int4_kernel!r}")
        if self.kv_cache_dtype not in ("auto", "float32", "float16"):
            raise ValueError(f"kv_cache_dtype must be auto|float32|float16, got "
                             f"{self.kv_cache_dtype!r}")
        if self.attention_kernel not in ("auto", "sdpa", "rows"):
            raise ValueError(f"attention_kernel must be auto|sdpa|rows, got {self.attention_kernel!r}")
        if self.unembed not in ("auto", "fp32", "fp16", "q8"):
            raise ValueError(f"unembed must be auto|fp32|fp16|q8, got {self.unembed!r}")
        if self.max_model_len < 16:
            raise ValueError("max_model_len must be >= 16")
        if self.prefill_chunk_size < 1 or self.max_tokens_per_step < self.prefill_chunk_size:
            raise ValueError("need 1 <= prefill_chunk_size <= max_tokens_per_step")
        if self.prefill_while_decoding < 1:
            raise ValueError("prefill_while_decoding must be >= 1")
        if self.kv_cache_memory_gb < 0:
            raise ValueError("kv_cache_memory_gb must be >= 0")


@dataclass(slots=True)
class SamplingParams:
    """Per-request decoding parameters. temperature 0 takes the greedy path."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; k >= 0: sampled token's logprob + top k
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    speculate: bool | None = None  # None: engine default
    acceptance: AcceptanceRule | None = None  # None: greedy at T=0, else engine default
    typical_epsilon: float | None = None
    typical_delta: float | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be in [0, 20], got {self.logprobs}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2]")
        if self.acceptance not in (None, "greedy", "typical", "rejection"):
            raise ValueError(f"unknown acceptance rule {self.acceptance!r}")
        if self.typical_epsilon is not None and not 0.0 < self.typical_epsilon < 1.0:
            raise ValueError("typical_epsilon must be in (0, 1)")
        if self.typical_delta is not None and not 0.0 < self.typical_delta < 1.0:
            raise ValueError("typical_delta must be in (0, 1)")
        self.stop = tuple(self.stop)
        self.stop_token_ids = tuple(self.stop_token_ids)
        if any(s == "" for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def resolved_acceptance(self, default: AcceptanceRule) -> AcceptanceRule:
        """Greedy requests verify greedily (lossless); others use the asked or default rule."""
        if self.greedy:
            return "greedy"
        rule = self.acceptance or default
        return "typical" if rule == "greedy" else rule
