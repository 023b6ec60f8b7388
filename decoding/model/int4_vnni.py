"""The int4 x int8 AVX512-VNNI kernel (kernels/int4_vnni.cpp): its JIT build, its weight
layout and its call.

PyTorch's CPU int4 kernel (`_weight_int4pack_mm_for_cpu`) multiplies in bf16 and is
compute-bound from a few rows on; llama.cpp's way (activations quantized to int8 per block
of 32, u8 x s8 dot products with vpdpbusd, exact in int32) does 4x the work per instruction.
The extension is compiled at first use with torch.utils.cpp_extension into the user's cache
(`$XDG_CACHE_HOME` or ~/.cache, /mtpserve/kernels), so later starts only load it. Anything
that stops it (non-x86, a CPU without VNNI, no compiler or headers) makes `available()`
False with one warning, and the caller keeps PyTorch's kernel.
"""

from __future__ import annotations

import logging
import platform
from pathlib import Path

import torch

from .kernel_build import BuiltOnce, build_extension, kernel_cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels") / "int4_vnni.cpp"
ROWS = 16     # output rows per weight block (one zmm of results)
GROUP = 32    # K per group: the weights' INT4_GROUP and the activations' int8 block
BLOCK = 320   # bytes per (16 rows x 32 K): 256 of nibbles, 16 fp16 scales, 16 fp16 mins



def cache_dir() -> Path:
    """Where built kernels live: one folder per source and torch version, kept across runs."""
    return kernel_cache_dir()


def _cpu_flags() -> set[str] | None:
    """The CPU's flags from /proc/cpuinfo (Linux), None where unreadable: lets an AVX2-only
    machine skip the compile; the extension's own check (has_vnni) still decides."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def _build() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        log.warning("int4 VNNI kernel: not an x86-64 CPU (%s); using PyTorch's int4 kernel",
                    platform.machine())
        return False
    flags = _cpu_flags()
    if flags is not None and "avx512_vnni" not in flags:
        log.warning("int4 VNNI kernel: this CPU lacks AVX512-VNNI; using PyTorch's int4 kernel")
        return False
    if not build_extension(SOURCE, "int4 VNNI kernel", "PyTorch's int4 kernel"):
        return False
    if not torch.ops.mtpserve_int4.has_vnni():
        log.warning("int4 VNNI kernel: this CPU lacks AVX512-VNNI; using PyTorch's int4 kernel")
        return False
    torch.library.register_fake("mtpserve_int4::mm")(_mm_fake)  # for torch.compile graphs
    torch.library.register_fake("mtpserve_int4::mm16")(_mm_fake)
    return True


def _mm_fake(x: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], n)


_kernel = BuiltOnce(_build)
available = _kernel.available


def supports(n: int, k: int) -> bool:
    """Shapes the kernel takes: whole 16-row blocks and whole 32-wide groups."""
    return n % ROWS == 0 and k % GROUP == 0 and n > 0 and k > 0


def kernel_values(scale: torch.Tensor, lo: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale and min [N, K/32] as the kernel stores them (fp16), back in fp32."""
    return scale.to(torch.float16).float(), lo.to(torch.float16).float()


def pack(codes: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor) -> torch.Tensor | None:
    """codes [N, K] in 0..15, scale and min [N, K/32] (w = code * scale + min) -> the
    kernel's [N/16, K/32, 320] uint8 layout (see the .cpp). None where a scale or min does
    not fit fp16 (the caller then keeps PyTorch's kernel)."""
    n, k = codes.shape
    nb, g = n // ROWS, k // GROUP
    d16, m16 = scale.to(torch.float16), lo.to(torch.float16)
    if not (bool(torch.isfinite(d16).all()) and bool(torch.isfinite(m16).all())):
        return None
    # [NB, 16 rows, G, 8 quads, 4] -> [NB, G, 8 quads, 16 rows * 4]: vector s = quad s
    c = codes.to(torch.uint8).reshape(nb, ROWS, g, 8, 4).permute(0, 2, 3, 1, 4).reshape(nb, g, 8, 64)
    nibbles = c[:, :, :4] | (c[:, :, 4:] << 4)  # quads 0..3 low, 4..7 high
    def per_block(v: torch.Tensor) -> torch.Tensor:  # [N, G] fp16 -> [NB, G, 32] bytes
        return v.reshape(nb, ROWS, g).permute(0, 2, 1).contiguous().view(torch.uint8)
    out = torch.cat([nibbles.reshape(nb, g, 256), per_block(d16), per_block(m16)], dim=-1)
    return out.contiguous()


def mm(x: torch.Tensor, packed: torch.Tensor, n: int, act_bits: int = 8) -> torch.Tensor:
    """x [M, K] (fp32 or bf16, CPU) @ W^T -> [M, N] in x's dtype, fp32 accumulation; x
    quantized per block of 32 to int8 (act_bits 8, vpdpbusd) or int16 (16, vpdpwssd)."""
    if act_bits == 16:
        return torch.ops.mtpserve_int4.mm16(x, packed, n)
    return torch.ops.mtpserve_int4.mm(x, packed, n)
