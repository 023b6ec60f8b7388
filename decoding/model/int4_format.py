"""int4 weights: how they are quantized, packed for the device's kernel, which int4 kernel
runs, and the load-time check that a kernel reads the packing as written.

int4 is asymmetric in groups of 32 along the input dimension, a scale and a zero point per
group (`int4_codes`): exactly GGUF's Q4_0/Q4_1 block layout (Q4_1 stores d*q + m =
(q - 8)*d + (m + 8d)), so re-quantizing a Q4_1 checkpoint recovers its codes instead of
quantizing twice. PyTorch's kernels read the codes packed their own way (`int4_pack`,
`int4_mm`): `_weight_int4pack_mm_for_cpu` on CPU, with bf16 activations (KERNEL_DTYPE),
and `_weight_int4pack_mm` (tinygemm, its own tile layout) on CUDA. On x86 CPUs with
AVX512-VNNI or AVX2 our own kernel (int4_vnni.py) can run instead: `resolve_int4_kernel`
turns `--int4-kernel` (INT4_KERNELS) into the kernel a device runs. Every quantized layer,
int8 as well as int4, multiplies unit vectors at `probe_columns` through its kernel at load
(`check_kernel`), so a build or device whose kernel reads the packing differently is a
clear error, not wrong tokens. The layer holding the weights is linear.py's `Linear`.
"""

from __future__ import annotations

import torch

from . import int4_vnni

INT4_GROUP = 32
# int4's CPU kernel: PyTorch's (aten, bf16 activations) or int4_vnni.py's, activations
# quantized per block of 32 to int16 (vnni16: AVX512-VNNI or AVX2) or int8 (vnni: AVX512-VNNI
# only); auto: vnni16 where it builds and this CPU has either, else aten
INT4_KERNELS = ("auto", "aten", "vnni", "vnni16")
VNNI_ACT_BITS = {"vnni": 8, "vnni16": 16}  # the VNNI kernels' activation bits
KERNEL_DTYPE = torch.bfloat16  # what the CPU weight-only kernels want as activations


def int4_codes(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max quantization per group: -> codes [N, K] int32 in 0..15,
    scales [N, K/group], mins [N, K/group] (w ~= codes * scale + min)."""
    n, k = w.shape
    g = w.float().reshape(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-10)
    codes = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
    return codes.reshape(n, k), scale, lo


def resolve_int4_kernel(name: str, device: torch.device | str) -> str:
    """EngineConfig.int4_kernel -> the kernel int4 layers on `device` use: 'aten', 'vnni'
    or 'vnni16'. CUDA (and any non-CPU device) keeps PyTorch's kernels; 'vnni' or 'vnni16'
    where the kernel cannot run here is an error, 'auto' then quietly (one warning) means
    'aten'. On an AVX2-only CPU (int4_vnni.isa() 1) 'auto' and 'vnni16' run the kernel's
    AVX2 path and 'vnni' (int8 activations, AVX512-VNNI only) is an error: an explicit
    choice is never quietly swapped for another."""
    if name not in INT4_KERNELS:
        raise ValueError(f"int4 kernel must be one of {'|'.join(INT4_KERNELS)}, got {name!r}")
    if name == "aten" or torch.device(device).type != "cpu":
        return "aten"
    if int4_vnni.available():
        if name == "vnni" and not int4_vnni.has_int8():
            raise ValueError("--int4-kernel vnni: int8 activations need AVX512-VNNI; this CPU "
                             "runs the int4 kernel's AVX2 path, int16 activations only: use "
                             "--int4-kernel vnni16 (or auto) or aten")
        return "vnni16" if name == "auto" else name
    if name != "auto":
        raise ValueError(f"--int4-kernel {name}: the int4 VNNI kernel cannot run here (see the "
                         "warning above: it needs an x86-64 CPU with AVX512-VNNI or "
                         "AVX2+FMA+F16C and a C++ compiler); use --int4-kernel auto or aten")
    return "aten"


def require_kernel_device(w: torch.Tensor, fmt: str) -> None:
    if w.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{fmt} weights use PyTorch's CPU or CUDA kernels, not {w.device.type}'s; "
                         "serve --weights dense")


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """codes [N, K] in 0..15 -> [N, K/2] uint8, element 2j in the high nibble of byte j:
    the input `_convert_weight_to_int4pack` (CUDA) documents."""
    c = codes.to(torch.uint8)
    return (c[:, 0::2] << 4) | c[:, 1::2]


def int4_pack(codes: torch.Tensor) -> torch.Tensor:
    """codes [N, K] int32 -> the packed weight the device's int4 kernel reads."""
    if codes.device.type == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    n, k = codes.shape
    if n % 8:
        raise ValueError(f"int4 on {codes.device.type} needs out_features divisible by 8, got {n}")
    # tinygemm packs 16-wide k-tiles 2, 4 or 8 at a time; wider is a wider load
    tiles = next(t for t in (8, 4, 2) if k % (16 * t) == 0)
    return torch.ops.aten._convert_weight_to_int4pack(pack_nibbles(codes).contiguous(), tiles)


def int4_mm(x: torch.Tensor, packed: torch.Tensor, group: int, scales_zeros: torch.Tensor
            ) -> torch.Tensor:
    if x.device.type == "cpu":
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, scales_zeros)
    return torch.ops.aten._weight_int4pack_mm(x.contiguous(), packed, group, scales_zeros)


def probe_columns(k: int, count: int = 24) -> torch.Tensor:
    """Input columns a kernel check reads: spread over K (every k-tile region), plus the
    first few so both nibbles of a byte and neighbouring bytes are covered."""
    spread = torch.linspace(0, k - 1, count).round().long()
    return torch.unique(torch.cat([torch.arange(min(k, 4)), spread]))


def check_kernel(fmt: str, mm, expected: torch.Tensor, step: torch.Tensor,
                 cols: torch.Tensor, in_features: int, kernel: str = "PyTorch's kernel") -> None:
    """mm(x) = x @ W^T through a weight-only kernel. expected, step [N, len(cols)]: W's
    quantized values at the probe columns and the quantization step there. The kernel
    applied to those unit vectors must give each value back to within half a step (plus
    bf16 rounding); a packing it reads differently moves almost every value by a step or
    more. (The VNNI kernel's int8 activations cost nothing here: a unit vector's block
    quantizes exactly, 1 -> 127 with d = 1/127, the other blocks to zero.) Raises
    ValueError naming the device."""
    dev = expected.device
    x = torch.zeros(len(cols), in_features, dtype=KERNEL_DTYPE, device=dev)
    x[torch.arange(len(cols), device=dev), cols.to(dev)] = 1
    try:
        seen = mm(x).float().t()
    except (RuntimeError, NotImplementedError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{fmt} weights on {dev.type}: {kernel} failed ({first}); "
                         "serve --weights dense") from None
    bad = (seen - expected).abs() > 0.5 * step + expected.abs() / 128
    if bool(bad.any()):
        raise ValueError(f"{fmt} weights on {dev.type}: {kernel} returned values that "
                         f"differ from the quantized weights ({int(bad.sum())} of {bad.numel()} "
                         "probed); this build reads the packing differently. Serve --weights dense")
