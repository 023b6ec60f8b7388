"""Our int4-weight CPU kernel (kernels/int4_vnni.cpp): its JIT build, its weight layout and
its call.

PyTorch's CPU int4 kernel (`_weight_int4pack_mm_for_cpu`) multiplies in bf16 and is
compute-bound from a few rows on; llama.cpp's way (activations quantized per block of 32,
exact integer dot products) does more work per instruction. Two activation widths share one
packed weight: int16 (`mm(..., 16)`, vnni16) and int8 (`mm(..., 8)`, vnni, as Q8_1).
The instruction set is chosen once per process (`isa()`): AVX512-VNNI (2: both widths,
vpdpwssd / vpdpbusd), else AVX2+FMA+F16C (1: int16 only, vpmaddwd, bitwise the AVX-512
int16 results), else none (0). `MTPSERVE_INT4_AVX2` (any value) makes an AVX-512 process
take the AVX2 path, as an AVX2-only CPU would (for tests and benchmarks).
The extension is compiled at first use with torch.utils.cpp_extension into the user's cache
(`$XDG_CACHE_HOME` or ~/.cache, /mtpserve/kernels), so later starts only load it. Anything
that stops it (non-x86, a CPU with neither AVX512-VNNI nor AVX2+FMA+F16C, no compiler or
headers) makes `available()` False with one warning, and the caller keeps PyTorch's kernel.
"""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from .device import cpu_flags
from .kernel_build import BuiltOnce, build_extension, kernel_cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels") / "int4_vnni.cpp"
ROWS = 16     # output rows per weight block (one zmm of results, two ymm on AVX2)
GROUP = 32    # K per group: the weights' INT4_GROUP and the activations' int8 block
BLOCK = 320   # bytes per (16 rows x 32 K): 256 of nibbles, 16 fp16 scales, 16 fp16 mins



def cache_dir() -> Path:
    """Where built kernels live: one folder per source and torch version, kept across runs."""
    return kernel_cache_dir()


ISA_NAMES = {2: "AVX512-VNNI", 1: "AVX2+FMA+F16C (int16 activations only)"}


def _cpu_can_run(flags: set[str]) -> bool:
    return "avx512_vnni" in flags or {"avx2", "fma", "f16c"} <= flags


def _build() -> bool:
    fallback = "PyTorch's int4 kernel"
    neither = "this CPU has neither AVX512-VNNI nor AVX2+FMA+F16C"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        log.warning("int4 VNNI kernel: not an x86-64 CPU (%s); using %s", platform.machine(),
                    fallback)
        return False
    flags = cpu_flags()  # a CPU with neither instruction set skips the compile
    if flags is not None and not _cpu_can_run(flags):
        log.warning("int4 VNNI kernel: %s; using %s", neither, fallback)
        return False
    if not build_extension(SOURCE, "int4 VNNI kernel", fallback):
        return False
    path = torch.ops.mtpserve_int4.isa()
    if path == 0:
        log.warning("int4 VNNI kernel: %s; using %s", neither, fallback)
        return False
    log.info("int4 VNNI kernel: the %s path%s", ISA_NAMES[path],
             " (MTPSERVE_INT4_AVX2 is set)" if os.environ.get("MTPSERVE_INT4_AVX2") is not None
             else "")
    torch.library.register_fake("mtpserve_int4::mm")(_mm_fake)  # for torch.compile graphs
    torch.library.register_fake("mtpserve_int4::mm16")(_mm_fake)
    torch.library.register_fake("mtpserve_int4::mm16_isa")(_mm_isa_fake)
    return True


def _mm_fake(x: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], n)


def _mm_isa_fake(x: torch.Tensor, packed: torch.Tensor, n: int, isa: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], n)


_kernel = BuiltOnce(_build)
available = _kernel.available


def isa() -> int:
    """The path this process runs: 2 (AVX512-VNNI), 1 (AVX2+FMA+F16C), 0 (none: the kernel
    is not available)."""
    return int(torch.ops.mtpserve_int4.isa()) if available() else 0


def has_int8() -> bool:
    """Whether the int8-activation kernel (`mm(..., 8)`, --int4-kernel vnni) runs here: it
    needs AVX512-VNNI (vpdpbusd); the AVX2 path has int16 activations only."""
    return isa() == 2


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
    quantized per block of 32 to int8 (act_bits 8, vpdpbusd: AVX512-VNNI only) or int16
    (16, vpdpwssd or on AVX2 vpmaddwd: the same bits)."""
    if act_bits == 16:
        return torch.ops.mtpserve_int4.mm16(x, packed, n)
    return torch.ops.mtpserve_int4.mm(x, packed, n)


@contextmanager
def live_rows(n: int, rows: int) -> Iterator[None]:
    """Within, on this thread: passes through the kernel compute their first `n` of `rows`
    rows and leave the rest of the output zero. For a compiled graph's padding rows (a
    one-row step runs as two, compiled.py): the AVX2 path pays ~1.45x at two rows what it
    pays at one. Each row's result does not depend on the others, so the real rows keep
    their bits. Nothing to do where the kernel is not loaded or no row is padding."""
    if n >= rows or not _kernel.loaded:
        yield
        return
    torch.ops.mtpserve_int4.set_live_rows(n)
    try:
        yield
    finally:
        torch.ops.mtpserve_int4.set_live_rows(0)
