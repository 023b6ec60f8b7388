"""Linear layer whose weight format can change after loading: dense, int8 or int4.

Decode on CPU is bound by streaming weights from memory, so weight-only quantization
reads fewer bytes per token: int8 with one scale per output channel
(`_weight_int8pack_mm`), or int4 in groups of 32 with a scale and a zero point per group
(`_weight_int4pack_mm_for_cpu`). Both kernels are fast on this CPU only with bf16 inputs,
so the input is cast to bf16 for the matmul and the output back to the compute dtype:
norms, attention and the KV cache keep fp32 where that is the dtype.
On x86 CPUs with AVX512-VNNI, int4 goes through our own kernel instead (int4_vnni.py:
activations quantized to int16 (vnni16, the default) or int8 (vnni) per block of 32, exact
integer dot products, 1.2-2.2x (int16) / 2-3x (int8) faster than PyTorch's at 1-64 rows),
which takes the compute dtype as it is (`--int4-kernel`); on AVX2-only CPUs
(AVX2+FMA+F16C) vnni16 runs too, bitwise the same results (1.2-1.7x its AVX-512
time), vnni does not.
On CUDA the same formats go through PyTorch's CUDA kernels (`_weight_int4pack_mm`, tinygemm,
which reads its own tile layout; `_weight_int8pack_mm`). Every quantized layer checks at
load that its kernel reproduces the quantized values, so a build or device whose kernel
reads the packing differently is a clear error, not wrong tokens.
How int4 is quantized (GGUF's Q4_0/Q4_1 blocks) and packed for each kernel, which int4
kernel runs (INT4_KERNELS) and that load-time check (`check_kernel`, int8's too):
int4_format.py.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

# int4_format's functions are called as int4_format.f: a patch of f there reaches Linear
from . import int4_format, int4_vnni
from .int4_format import INT4_GROUP, KERNEL_DTYPE, VNNI_ACT_BITS

# From this many rows on a quantized layer with a wide copy multiplies by its bf16 dense
# copy instead: the weight-only kernels are compute-bound and grow linearly with rows (int4
# in blocks of 4), the bf16 GEMM (native bf16 CPUs) does not. 30 layers of this model,
# int4 vs the packed bf16 copy: 13.0 vs 12.6 ms at 8 rows, 18.4 vs 13.9 at 12, 23.1 vs 16.0
# at 16; in the engine 12 beat 32 from 12 rows on (verify k=16 43 vs 47 ms, batch-16 decode
# 57 vs 61) and 5 lost at 8 rows (docs/experiments.md).
WIDE_ROWS = 12


def bucket_rows(m: int) -> int:
    """Rows a oneDNN pass of m rows runs at: m itself up to 16 (decode and verify), then the
    next of four sizes per octave (20, 24, 28, 32, 40, ...; at most 25% padding). oneDNN
    (and PyTorch's ideep layer over it) cache one primitive per input shape, each holding
    memory: one pass at every row count 1..512 over the four projection shapes grew RSS by
    1.1-1.8 GB raw, ~100 MB bucketed (benchmarks/onednn_shapes.py). 44 sizes up to 2048."""
    if m <= 16:
        return m
    step = 1 << (m.bit_length() - 3)
    return -(-m // step) * step


def _in_buckets(fn, x: torch.Tensor, *args) -> torch.Tensor:
    """fn(x, *args) for 2-D x, run on x padded with zero rows to bucket_rows(len(x))."""
    m = x.shape[0]
    b = bucket_rows(m)
    if b == m:
        return fn(x, *args)
    padded = x.new_zeros(b, x.shape[1])
    padded[:m] = x
    return fn(padded, *args)[:m]


def pack_for_onednn(w: torch.Tensor, batch_hint: int = 1) -> torch.Tensor | None:
    """w [N, K] (fp32 or bf16) reordered into oneDNN's blocked layout for its linear (what
    inductor's CPU backend emits), or None where this PyTorch build lacks the ops. Measured
    here: the fp32 unembedding's 16-row logits 5.8 vs 14.3 ms, the dense bf16 trunk's decode
    step 34-36 vs 42-44 ms (docs/experiments.md)."""
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w, batch_hint)
        onednn_linear(w.new_zeros(2, w.shape[1]), packed)  # the op runs in this build
        return packed
    except (AttributeError, RuntimeError):
        return None


def onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """x [M, K] @ W^T (+ bias, added before rounding) for W packed by pack_for_onednn."""
    return _in_buckets(torch.ops.mkldnn._linear_pointwise, x, packed, bias, "none", [], "")


def pack_fp16(w: torch.Tensor) -> torch.Tensor | None:
    """w [N, K] fp32 rounded to fp16 and packed for FBGEMM's fp16 GEMM (CPU), whose input,
    accumulation and output stay fp32: half the bytes of fp32, logits not rounded to a
    16-bit grid. None where this build or CPU lacks the op. Measured for the unembedding
    (49152 x 576, benchmarks/unembed_kernels.py): max |logit error| 0.02 vs fp32 dense
    where per-channel int8 weights give 0.9 and bf16 outputs 0.2. FBGEMM pads K to whole
    512-row blocks in memory (not in what it streams): K=576 holds ~96 MB, not 57."""
    if w.device.type != "cpu" or float(w.detach().abs().max()) > 6e4:  # fp16's range
        return None
    try:
        packed = torch.ops.quantized.linear_prepack_fp16(w.detach().float().contiguous(), None)
        torch.ops.quantized.linear_dynamic_fp16(w.new_zeros(2, w.shape[1]), packed)
        return packed
    except (AttributeError, RuntimeError):
        return None


def fp16_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x [M, K] fp32 @ W^T for W packed by pack_fp16 -> fp32 [M, N]. Each row's result is
    the same whichever other rows share the pass (no activation quantization)."""
    return torch.ops.quantized.linear_dynamic_fp16(x.float().contiguous(), packed)


def unpack_onednn(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """The [N, K] weight back from pack_for_onednn's layout, exactly: the identity times it
    (one nonzero term per sum)."""
    eye = torch.eye(in_features, dtype=packed.dtype, device=packed.device)
    return onednn_linear(eye, packed).t().contiguous()


@dataclass(frozen=True)
class ChunkRows:
    """The batch-invariant mode's row plan of one pass (set by the trunk, chunk_rows()):
    each prefill chunk of WIDE_ROWS+ rows, whose rows depend only on the chunk (as its
    SDPA attention does), is multiplied ALONE by the bf16 wide copy, the way that chunk
    would be in any pass; every other row (decode rows, tree nodes, short chunks) by the
    row-invariant one-row kernel. chunks: row slices or index tensors; rest: the other rows
    (None: none)."""
    chunks: tuple
    rest: torch.Tensor | slice | None


_CHUNK_ROWS: ContextVar[ChunkRows | None] = ContextVar("chunk_rows", default=None)


@contextmanager
def chunk_rows(plan: ChunkRows | None) -> Iterator[None]:
    """Quantized layers in the batch-invariant mode follow `plan` inside the block."""
    token = _CHUNK_ROWS.set(plan)
    try:
        yield
    finally:
        _CHUNK_ROWS.reset(token)


INVARIANCE_ROWS = (2, 3, 5, 8, 12, 16, 17, 33, 64)  # pass sizes the row-invariance check runs


@torch.no_grad()
def row_invariant(mm, in_features: int, dtype: torch.dtype, device: torch.device | str = "cpu",
                  rows: tuple[int, ...] = INVARIANCE_ROWS) -> bool:
    """The row-invariance rule every kernel of the batch-invariant mode must meet: for
    inputs x [M, K], mm(x)[i] is BITWISE mm(x[i:i+1]) for every M in `rows` (so a row's
    result does not depend on how many rows share the pass, nor on what they hold).
    Measured per kernel here (benchmarks/row_invariance.py): the int4 and int8 weight-only
    kernels meet it, the bf16 wide copy does not from 32 rows (K=1536), oneDNN's fp32
    packed and MKL's fp32 GEMMs do not from 2 rows (M=1 is a GEMV)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(max(rows), in_features, generator=g).to(device=device, dtype=dtype)
    single = torch.cat([mm(x[i:i + 1]) for i in range(max(rows))])
    return all(torch.equal(mm(x[:m]), single[:m]) for m in rows)


def _wide(w: torch.Tensor) -> torch.Tensor | None:
    """The bf16 copy for passes of WIDE_ROWS+ rows, in oneDNN's packed layout: bucketed, as
    fast as F.linear over a plain copy unbucketed and ~20% faster than F.linear bucketed at
    random row counts (benchmarks/onednn_shapes.py). None (no copy) where the build cannot
    pack: there bf16 GEMMs are no faster than the kernels."""
    return pack_for_onednn(w.to(KERNEL_DTYPE))


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.register_buffer("int8_weight", None, persistent=False)
        self.register_buffer("int8_scales", None, persistent=False)
        self.register_buffer("int4_weight", None, persistent=False)
        self.register_buffer("int4_scales_zeros", None, persistent=False)
        self.register_buffer("int4_vnni", None, persistent=False)  # int4_vnni.pack's layout
        self.int4_act_bits = 16  # the VNNI kernel's activations: int16 (vnni16) or int8 (vnni)
        self.weight_t: torch.Tensor | None = None  # [in, out] storage, see transpose_storage
        self.wide_weight: torch.Tensor | None = None  # packed bf16 copy, see quantize_int4
        self.packed_weight: torch.Tensor | None = None  # oneDNN layout, see transpose_storage
        self.invariant = False  # batch-invariant mode: one kernel for every row count

    @property
    def weight_format(self) -> str:
        if self.int4_weight is not None or self.int4_vnni is not None:
            return "int4"
        return "int8" if self.int8_weight is not None else "dense"

    @torch.no_grad()
    def set_weight(self, w: torch.Tensor) -> None:
        self.weight.copy_(w.to(self.weight.dtype))

    @torch.no_grad()
    def set_bias(self, b: torch.Tensor) -> None:
        assert self.bias is not None  # internal: only called when the config has bias
        self.bias.copy_(b.to(self.bias.dtype))

    def _drop_dense(self) -> None:
        self.weight_t = None  # the quantized or packed form replaces both layouts
        self.weight = nn.Parameter(torch.empty(0, dtype=self.weight.dtype,
                                               device=self.weight.device), requires_grad=False)

    @torch.no_grad()
    def quantize_int8(self, wide_copy: bool = False) -> None:
        """Symmetric per-row int8; drops the dense weight to free its memory.
        wide_copy: also keep the quantized values as bf16 for passes of many rows."""
        int4_format.require_kernel_device(self.weight, "int8")
        w = self.weight.float()
        scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        self.int8_weight = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        self.int8_scales = scales.to(KERNEL_DTYPE)
        cols = int4_format.probe_columns(self.in_features).to(w.device)
        step = self.int8_scales.float()[:, None].expand(-1, len(cols))
        int4_format.check_kernel("int8", self._int8_mm, self.int8_weight[:, cols].float() * step,
                                 step, cols, self.in_features)
        if wide_copy:
            self.wide_weight = _wide(self.int8_weight.float() * self.int8_scales.float()[:, None])
        self._drop_dense()

    @torch.no_grad()
    def quantize_int4(self, group: int = INT4_GROUP, wide_copy: bool = False,
                      kernel: str = "aten") -> None:
        """Asymmetric int4 in groups along the input dimension; drops the dense weight.
        wide_copy: also keep, as bf16, the very values the kernel multiplies by (codes,
        scales and zeros as it stores them), for passes of WIDE_ROWS rows or more (PyTorch's
        kernel only: the VNNI kernel is faster than the copy at every row count).
        kernel: int4_format.INT4_KERNELS; a layer the VNNI kernel cannot take (N not in
        16s, fp16 overflow) keeps PyTorch's."""
        int4_format.require_kernel_device(self.weight, "int4")
        if self.in_features % group:
            raise ValueError(f"int4 needs in_features divisible by {group}, got {self.in_features}")
        codes, scale, lo = int4_format.int4_codes(self.weight, group)
        resolved = int4_format.resolve_int4_kernel(kernel, self.weight.device)
        if (resolved in VNNI_ACT_BITS and group == int4_vnni.GROUP
                and int4_vnni.supports(self.out_features, self.in_features)):
            self.int4_vnni = int4_vnni.pack(codes, scale, lo)
            self.int4_act_bits = VNNI_ACT_BITS[resolved]
        if self.int4_vnni is not None:
            self.int4_group = group
            s_k, m_k = int4_vnni.kernel_values(scale, lo)  # [N, K/g] fp32, as it multiplies
            cols = int4_format.probe_columns(self.in_features).to(codes.device)
            values = codes[:, cols].float() * s_k[:, cols // group] + m_k[:, cols // group]
            int4_format.check_kernel("int4", self._int4_mm, values, s_k[:, cols // group],
                                     cols, self.in_features, kernel="the int4 VNNI kernel")
            # No bf16 wide copy beside it, whatever wide_copy says: the VNNI kernel beats
            # oneDNN's bf16 GEMM at every row count measured, 1..512 (1.1-7x,
            # docs/benchmarks.md section 6), and the copy would cost 2 bytes per weight.
            self._drop_dense()
            return
        self.int4_weight = int4_format.int4_pack(codes)
        # The kernels compute (code - 8) * scale + zero, hence zero = min + 8 * scale.
        sz = torch.stack([scale, lo + 8 * scale], dim=-1)  # [N, K/g, 2]
        self.int4_scales_zeros = sz.transpose(0, 1).contiguous().to(KERNEL_DTYPE)
        self.int4_group = group
        s_k, z_k = self.int4_scales_zeros.float().transpose(0, 1).unbind(-1)  # [N, K/g]
        cols = int4_format.probe_columns(self.in_features).to(codes.device)
        values = (codes[:, cols].float() - 8) * s_k[:, cols // group] + z_k[:, cols // group]
        int4_format.check_kernel("int4", self._int4_mm, values, s_k[:, cols // group], cols,
                                 self.in_features)
        if wide_copy:
            w = (codes.float() - 8).view(codes.shape[0], -1, group) * s_k[..., None] + z_k[..., None]
            self.wide_weight = _wide(w.reshape(codes.shape))
        self._drop_dense()

    def _int4_mm(self, x: torch.Tensor) -> torch.Tensor:
        if self.int4_vnni is not None:  # fp32 or bf16 as given (int16/int8 inside), same out
            x = x if x.dtype in (torch.float32, KERNEL_DTYPE) else x.float()
            return int4_vnni.mm(x, self.int4_vnni, self.out_features, self.int4_act_bits)
        return int4_format.int4_mm(x.to(KERNEL_DTYPE), self.int4_weight, self.int4_group,
                                   self.int4_scales_zeros)

    def _int8_mm(self, x: torch.Tensor) -> torch.Tensor:
        # CUDA's int8 kernel reads x by raw pointer (and is one thread per output: correct,
        # not fast; int4's tinygemm is the fast CUDA format)
        return torch.ops.aten._weight_int8pack_mm(x.to(KERNEL_DTYPE).contiguous(),
                                                  self.int8_weight, self.int8_scales)

    def _one_row_mm(self, x: torch.Tensor) -> torch.Tensor:
        """The weight-only kernel (int4 or int8): the one that serves a single row. x in
        the compute dtype: PyTorch's kernels take it as bf16, the VNNI kernel as it is."""
        return self._int4_mm(x) if self.weight_format == "int4" else self._int8_mm(x)

    def _by_plan(self, x: torch.Tensor, plan: ChunkRows) -> torch.Tensor:
        """Batch-invariant mode with prefill chunks in the pass (ChunkRows): each chunk
        through the wide copy alone, the other rows through the one-row kernel."""
        if plan.rest is None and len(plan.chunks) == 1:
            return onednn_linear(x[plan.chunks[0]].to(KERNEL_DTYPE), self.wide_weight)
        y = x.new_empty(x.shape[0], self.out_features)
        for rows in plan.chunks:
            y[rows] = onednn_linear(x[rows].to(KERNEL_DTYPE), self.wide_weight).to(x.dtype)
        if plan.rest is not None:
            y[plan.rest] = self._one_row_mm(x[plan.rest]).to(x.dtype)
        return y

    def kernel_kind(self) -> tuple:
        """What decides how this layer computes a pass (the kernel, its activations, the
        shape), not its weights' values: layers of one kind meet the row rule alike."""
        storage = ("int4_vnni" if self.int4_vnni is not None else "int4_aten"
                   if self.int4_weight is not None else "int8" if self.int8_weight is not None
                   else "packed" if self.packed_weight is not None else "transposed"
                   if self.weight_t is not None else "dense")
        return (storage, self.int4_act_bits, getattr(self, "int4_group", None),
                self.in_features, self.out_features, self.bias is not None,
                self.weight.dtype, self.weight.device)

    def set_row_invariant(self, check: bool = True) -> bool:
        """Batch-invariant mode: the layer computes every pass with the one kernel that
        serves a single row (never the wide copy, whose bf16 GEMM picks its algorithm by
        row count), and checks that kernel against the rule (row_invariant). Returns
        whether it holds (True unchecked with `check` False: a layer of the same
        kernel_kind was checked)."""
        self.invariant = True
        if not check:
            return True
        dtype = KERNEL_DTYPE if self.weight_format != "dense" else (
            self.packed_weight.dtype if self.packed_weight is not None else self.weight.dtype)
        dev = (self.int4_weight if self.int4_weight is not None else
               self.int4_vnni if self.int4_vnni is not None else
               self.int8_weight if self.int8_weight is not None else
               self.packed_weight if self.packed_weight is not None else self.weight).device
        return row_invariant(self, self.in_features, dtype, dev)

    @torch.no_grad()
    def transpose_storage(self) -> None:
        """CPU storage for the skinny decode matmuls, no extra copy kept: oneDNN's packed
        layout (faster than BLAS at every row count here, fp32 and bf16: docs/benchmarks.md),
        else [in, out] with x @ W^T computed from it, which BLAS streams faster than [out, in]."""
        if (self.weight_format != "dense" or self.weight_t is not None
                or self.packed_weight is not None):
            return
        packed = pack_for_onednn(self.weight)
        if packed is not None:
            self.packed_weight = packed
            self._drop_dense()
            return
        self.weight_t = self.weight.t().contiguous()
        self.weight = nn.Parameter(self.weight_t.t(), requires_grad=False)  # a view

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """The dense [out, in] weight, whatever the storage (dense formats only)."""
        if self.packed_weight is not None:
            return unpack_onednn(self.packed_weight, self.in_features)
        if self.weight_format != "dense":
            raise ValueError(f"{self.weight_format} weights have no dense copy")
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_t is not None:
            y = torch.matmul(x, self.weight_t)
        elif self.packed_weight is not None or self.weight_format != "dense":
            x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
            if self.packed_weight is not None:  # bias fused, as F.linear does
                y = onednn_linear(x2, self.packed_weight, self.bias)
            else:  # the kernels cast x themselves (the VNNI kernel takes fp32 as it is)
                # the compiled graph (model/compiled.py) has no chunk plan: one-row kernel
                plan = (_CHUNK_ROWS.get() if self.invariant and not torch.compiler.is_compiling()
                        else None)
                if plan is not None and self.wide_weight is not None:
                    y = self._by_plan(x2, plan)
                elif (self.wide_weight is not None and x2.shape[0] >= WIDE_ROWS
                        and not self.invariant and not torch.compiler.is_compiling()):
                    # Compiled (model/compiled.py): the weight-only kernel at every row
                    # count; inductor may replace it with its own GEMM for the frozen
                    # weight, and cannot lower the pre-packed oneDNN copy.
                    y = onednn_linear(x2.to(KERNEL_DTYPE), self.wide_weight)
                else:
                    y = self._one_row_mm(x2)
                y = y.to(x.dtype)
            if x.dim() != 2:  # the trunk's packed [T, H] never pays for these
                y = y.reshape(*x.shape[:-1], self.out_features)
        else:
            return F.linear(x, self.weight, self.bias)
        return y if self.bias is None or self.packed_weight is not None else y + self.bias
