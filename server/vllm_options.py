"""The vLLM backend's startup options: `mtpserve serve` flags -> `VllmOptions`, refusing
(never silently dropping) what vLLM cannot do, and the check that vLLM is installed.

Separate from the backend (vllm_backend.py) so that the CLI can validate flags and
refuse a configuration before anything loads, and without vLLM installed.

Mapping: `--tensor-parallel-size`, `--pipeline-parallel-size`, `--max-num-seqs`,
`--max-model-len`, `--dtype`, `--seed` pass through; `--kv-cache-gb` becomes
`kv_cache_memory_bytes`; `--vllm-engine-args` adds AsyncEngineArgs mtpserve does not own.
Refused at startup: native-only flags (`--weights int8|int4`, `--tree`, `--acceptance
typical|greedy`, `--typical-*`, `--proposer hybrid`, `--prefill-chunk`, `--device`,
`--dtype float64`).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from typing import Any

INSTALL_HINT = ("--backend vllm needs vLLM, which is not installed: pip install "
                "'mtpserve[vllm]' (vLLM's CPU build; on GPU machines: pip install vllm)")
NGRAM = {"prompt_lookup_max": 3, "prompt_lookup_min": 1, "num_speculative_tokens": 4}
# AsyncEngineArgs that mtpserve's flags set; --vllm-engine-args may not override them
OWNED_ENGINE_ARGS = frozenset({
    "model", "tokenizer", "dtype", "max_model_len", "max_num_seqs", "seed",
    "tensor_parallel_size", "pipeline_parallel_size", "speculative_config",
    "served_model_name", "kv_cache_memory_bytes", "per_request_spec_decode_metrics"})

# Native-engine flags that have no vLLM counterpart: dest -> (values allowed under vLLM, why).
# A flag is refused only when given explicitly with another value.
NATIVE_ONLY_FLAGS: dict[str, tuple[tuple[Any, ...], str]] = {
    "weights": (("auto", "dense"), "vLLM serves the exported dense weights; weight-only "
                                   "int8/int4 is the native engine's"),
    "tree": (("auto",), "vLLM's Medusa drafts a chain of each head's top-1 token, not a "
                        "token tree"),
    "acceptance": (("rejection",), "vLLM verifies sampled requests by rejection sampling "
                                   "only (pass --acceptance rejection or leave it out)"),
    "typical_epsilon": ((), "typical acceptance is the native engine's"),
    "typical_delta": ((), "typical acceptance is the native engine's"),
    "proposer": (("heads", "ngram"), "vLLM drafts from one source: heads (Medusa) or ngram"),
    "prefill_chunk": ((), "vLLM sizes chunked prefill with its own scheduler"),
    "prefill_while_decoding": ((), "vLLM sizes chunked prefill with its own scheduler"),
    "device": (("auto",), "vLLM picks the device from its build; select GPUs with "
                          "CUDA_VISIBLE_DEVICES"),
    "dtype": (("auto", "float32", "bfloat16", "float16"), "vLLM does not compute in float64"),
}


class BackendConfigError(ValueError):
    """A startup configuration the vLLM backend refuses (exit status 2 with the message)."""


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def import_vllm() -> Any:
    """`import vllm`, or BackendConfigError with the install hint."""
    try:
        import vllm  # noqa: F401
        from vllm.v1.engine.async_llm import AsyncLLM  # noqa: F401
    except ImportError as exc:
        raise BackendConfigError(f"{INSTALL_HINT} ({exc})") from None
    return vllm


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


# -- startup options -------------------------------------------------------------------------
@dataclass
class VllmOptions:
    model: str | None  # GGUF file or HF folder; None: the embedded default
    dtype: str = "auto"
    max_num_seqs: int = 16
    max_model_len: int = 2048
    seed: int = 0
    kv_cache_gb: float = 0.0
    speculate: str = "auto"  # off | on | auto (vLLM: on and auto are the same)
    proposer: str | None = None  # heads | ngram | None (default: heads if any, else ngram)
    heads: str | None = None
    num_speculative_tokens: int | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    cache_dir: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # more AsyncEngineArgs (tests)


def options_from_args(args: argparse.Namespace, explicit: set[str]) -> VllmOptions:
    """The vLLM backend's options from `mtpserve serve` flags; `explicit`: the dests given
    on the command line. Raises BackendConfigError for what vLLM cannot do."""
    refused = []
    for dest, (allowed, why) in NATIVE_ONLY_FLAGS.items():
        if dest in explicit and getattr(args, dest, None) not in allowed:
            refused.append(f"{_flag(dest)} {getattr(args, dest)}: {why}")
    if refused:
        raise BackendConfigError(
            "--backend vllm cannot honour " + "; ".join(refused)
            + ". Drop these flags or serve with --backend native.")
    speculate = "off" if getattr(args, "no_speculate", False) else args.speculate
    proposer = args.proposer if "proposer" in explicit else None
    nst = getattr(args, "num_speculative_tokens", None)
    if speculate == "off" and ({"heads", "proposer"} & explicit or nst is not None):
        raise BackendConfigError("--speculate off with --heads/--proposer/"
                                 "--num-speculative-tokens: choose one")
    if proposer == "ngram" and args.heads is not None:
        raise BackendConfigError("--proposer ngram drafts from the prompt: --heads has no "
                                 "use with it under --backend vllm")
    if nst is not None and nst < 1:
        raise BackendConfigError("--num-speculative-tokens must be >= 1")
    for name in ("tensor_parallel_size", "pipeline_parallel_size"):
        if getattr(args, name, 1) < 1:
            raise BackendConfigError(f"{_flag(name)} must be >= 1")
    extra: dict[str, Any] = {}
    raw = getattr(args, "vllm_engine_args", None)
    if raw:
        try:
            extra = json.loads(raw)
        except ValueError as exc:
            raise BackendConfigError(f"--vllm-engine-args: not JSON ({exc})") from None
        if not isinstance(extra, dict):
            raise BackendConfigError("--vllm-engine-args must be a JSON object")
        owned = sorted(set(extra) & OWNED_ENGINE_ARGS)
        if owned:
            raise BackendConfigError(f"--vllm-engine-args: set {', '.join(owned)} with "
                                     f"mtpserve's own flags")
    return VllmOptions(
        extra=extra,
        model=args.model, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len, seed=args.seed, kv_cache_gb=args.kv_cache_gb,
        speculate=speculate, proposer=proposer, heads=args.heads,
        num_speculative_tokens=nst,
        tensor_parallel_size=getattr(args, "tensor_parallel_size", 1),
        pipeline_parallel_size=getattr(args, "pipeline_parallel_size", 1),
        cache_dir=getattr(args, "vllm_cache_dir", None))
