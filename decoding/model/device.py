"""Where and how the engine computes on this machine: the device, the compute and KV-cache
dtypes, the weight format, and returning the loader's freed memory. Each choice is
measured (docs/benchmarks.md); `LLMEngine.from_config` applies them.
"""

from __future__ import annotations

import ctypes

import torch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device, weights: str = "dense") -> torch.dtype:
    """The compute dtype of activations, attention and the KV cache."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if weights in ("int8", "int4"):
        # The weight-only kernels take bf16 inputs either way; around them fp32 measured
        # faster than bf16 even on CPUs with native bf16 (PyTorch's CPU flash attention
        # repacks bf16 K/V on every call) and keeps one-row and k-row passes within fp32
        # rounding of each other (docs/experiments.md).
        return torch.float32
    # Without native bf16 instructions PyTorch's CPU bf16 matmuls take a slow path
    # (measured 2-3x slower than fp32, docs/benchmarks.md), so fp32 unless the CPU
    # has avx512_bf16 / AMX.
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def kv_cache_dtype(dtype: torch.dtype, device: torch.device, name: str = "auto",
                   quantized: bool = False, row_kernel: bool = False) -> torch.dtype:
    """The KV cache's dtype (EngineConfig.kv_cache_dtype `name`). auto: on CPU, fp16 where
    the weights are quantized and the row attention kernel reads the cache (it widens fp16
    to fp32 as it loads: half the bytes, the same fp32 arithmetic; the K/V rounding, ~5e-4
    relative, is far below int4's), else fp32 (or the model's fp64): dense weights keep the
    reference precision, and a bf16 cache through PyTorch's CPU flash attention, which
    repacks bf16 K/V on every call, measured 4-7x slower than fp32 for decode rows
    (docs/experiments.md). Elsewhere the model's dtype."""
    if name != "auto":
        return {"float32": torch.float32, "float16": torch.float16}[name]
    if device.type != "cpu":
        return dtype
    if quantized and row_kernel:
        return torch.float16
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def malloc_trim() -> None:
    """Return freed heap pages to the OS: glibc keeps them, and after loading they are the
    loader's fp32 temporaries (RSS 1122 -> 696 MB for the default model). No-op off glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def cpu_flags() -> set[str] | None:
    """The CPU's flags from /proc/cpuinfo (Linux), None where unreadable."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def cpu_has_native_bf16() -> bool:
    flags = cpu_flags() or set()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_weights(name: str, device: torch.device, trunk_quant: str | None) -> str:
    """auto: on CPU, int4 when the checkpoint itself stores the trunk as group-32 4-bit
    blocks (GGUF Q4_0 / Q4_1): the kernel then computes with the file's own codes, reads a
    quarter of fp32's bytes and verifies small trees at nearly the cost of one token
    (docs/benchmarks.md). Everything else stays dense: quantizing is the user's call."""
    if name != "auto":
        return name
    if device.type == "cpu" and trunk_quant in ("Q4_0", "Q4_1"):
        return "int4"
    return "dense"
