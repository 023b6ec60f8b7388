"""The Q8_0 unembedding (kernels/q8_unembed.cpp, `--unembed q8`): GGUF's own int8 blocks of
the logits' weights, int16 activations, fp32 logits.

The default GGUF stores the tied embedding as Q8_0: blocks of 32 int8 values q with one
fp16 scale d, value = d * q, which the checkpoint loader dequantizes to fp32 (exactly: an
fp16 times an int8 fits fp32's 24 bits). `recover` finds (d, q) back from those fp32 values
and checks that d * q gives every value bitwise; the kernel then reads exactly the file's
weights (where the fp16 copy rounds d * q to 11 bits), 1.06 bytes per weight (fp16: 2).

What is quantized at run time: the activations, each row per block of 32 to int16 (d_x =
max|x| / 32767, round to nearest even), so that a group's products are exact integer dots
(vpdpwssd: 16 instructions per row and group where fp32 activations took 32 FMAs). Each x is
off by at most ~1/65534 of its block's largest |x|: a logit by at most sum over blocks of
0.51 * d_x * sum |w| beyond fp32 rounding (~1e-3 on the real model's logits, whose greedy
choices it flips only at near-ties: docs/benchmarks.md section 6). int8 activations were
far coarser (logits 0.9-2.4 off, benchmarks/unembed_kernels.py).

The extension is built like int4_vnni's (kernel_build.build_extension, into the user's
cache); the kernel runs with AVX-512 (F, BW, VNNI) or AVX2+FMA+F16C (the same bits on both),
and a row's logits are the same bits alone or among other rows. Anything that stops it
makes `available()` False with one warning, and the caller keeps the fp16 or fp32
unembedding.
"""

from __future__ import annotations

import logging
import platform
from pathlib import Path

import torch

from .kernel_build import BuiltOnce, aligned64, build_extension

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels") / "q8_unembed.cpp"
ROWS = 16     # output rows per weight block
GROUP = 32    # K per Q8_0 block
BLOCK = 544   # bytes per (16 rows x 32 K): 512 of int8 values, 16 fp16 scales


def _build() -> bool:
    fallback = "the fp16/fp32 unembedding"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        log.warning("Q8 unembedding kernel: not an x86-64 CPU (%s); using %s",
                    platform.machine(), fallback)
        return False
    if not build_extension(SOURCE, "Q8 unembedding kernel", fallback):
        return False
    if torch.ops.mtpserve_q8.isa() == 0:
        log.warning("Q8 unembedding kernel: this CPU has neither AVX-512 (F, BW, VNNI) nor "
                    "AVX2+FMA+F16C; using %s", fallback)
        return False
    torch.library.register_fake("mtpserve_q8::mm")(_mm_fake)  # for torch.compile graphs
    return True


def _mm_fake(x: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], n)


_kernel = BuiltOnce(_build)
available = _kernel.available


def supports(n: int, k: int) -> bool:
    """Shapes the kernel takes: whole 16-row blocks and whole 32-wide blocks."""
    return n % ROWS == 0 and k % GROUP == 0 and n > 0 and k > 0


@torch.no_grad()
def recover(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """fp32 w [N, K] that a Q8_0 tensor dequantized to -> (q int8 [N, K], d fp16 [N, K/32])
    with fp32(d) * q == w BITWISE for every element, or None where w is not such a tensor
    (another quantization, a dense float checkpoint, -0.0 entries). Q8_0 (ggml, gguf-py)
    writes d = max|w| / 127 rounded to fp16 and q = round(w / d), so the block's largest
    value is d * (+-127) and max|w| / 127 gives d back exactly; every value is checked."""
    if w.dim() != 2 or w.dtype != torch.float32 or not supports(*w.shape):
        return None
    n, k = w.shape
    qs = torch.empty(n, k, dtype=torch.int8)
    ds = torch.empty(n, k // GROUP, dtype=torch.float16)
    for rows in torch.arange(n).split(4096):  # small temporaries
        b = w[rows].detach().cpu().reshape(len(rows), k // GROUP, GROUP)
        d = b.abs().amax(-1) / 127
        d16 = d.to(torch.float16)
        if not torch.equal(d16.float(), d):
            return None
        safe = torch.where(d == 0, torch.ones_like(d), d)
        q = torch.round(b / safe[..., None])
        if bool((q.abs() > 127).any()):
            return None
        q8 = q.to(torch.int8)
        back = q8.float() * d16.float()[..., None]  # what is stored, as dequantize computes
        if not torch.equal(back.view(torch.int32), b.view(torch.int32)):  # bitwise
            return None
        qs[rows] = q8.reshape(len(rows), k)
        ds[rows] = d16
    return qs, ds


def dequantize(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """fp32(d) * q [N, K]: the values the kernel multiplies by."""
    n, k = q.shape
    return (q.float().reshape(n, k // GROUP, GROUP) * d.float()[..., None]).reshape(n, k)


def pack(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """q int8 [N, K], d fp16 [N, K/32] -> the kernel's [N/16, K/32, 544] uint8 layout, 64-byte
    aligned: per 16 rows x 32 K, 16 chunks of 32 bytes (chunk p: byte 2j + e = row j's q at
    K offset 2p + e, so that one sign-extended chunk holds each row's K pair in a 32-bit
    lane), then the 16 rows' fp16 d (see the .cpp)."""
    n, k = q.shape
    nb, g = n // ROWS, k // GROUP
    qb = (q.view(torch.uint8).reshape(nb, ROWS, g, GROUP // 2, 2)
          .permute(0, 2, 3, 1, 4).reshape(nb, g, 512))  # [NB, G, pair, row, 2]
    db = d.reshape(nb, ROWS, g).permute(0, 2, 1).contiguous().view(torch.uint8)  # [NB, G, 32]
    flat = torch.cat([qb, db], dim=-1).reshape(-1)
    return aligned64(flat.view(nb, g, BLOCK))


def mm(x: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    """x [M, K] fp32 (CPU) @ W^T -> fp32 [M, N], x quantized to int16 per block of 32 inside
    (see the module doc); row i the same bits alone or among rows."""
    return torch.ops.mtpserve_q8.mm(x.float().contiguous(), packed, n)
