"""The int4 AVX512-VNNI kernel (model/int4_vnni.py, `--int4-kernel vnni16|vnni`), with
activations in int16 (vpdpwssd) or int8 (vpdpbusd): what it computes (against an fp64
reference of the same integer math, and against the dense dequantized matmul within what
int16 / int8 activations allow), that a row's bits never depend on the other rows of the
call, its place in Linear (load-time check, wide copy, row rule), the fallback to PyTorch's
kernel, and greedy equivalence through an engine. Its AVX2 path (int16 activations only,
vpmaddwd): bitwise the AVX-512 results, row by row, and through an engine (forced with
MTPSERVE_INT4_AVX2 in a fresh process).

Skipped, with the reason, where the kernel cannot load (non-x86, neither AVX512-VNNI nor
AVX2+FMA+F16C, no compiler)."""

from __future__ import annotations

import hashlib
import json
import logging

import pytest
import torch

from decoding_helpers import (REPEATING, fresh_process, plain_and_speculative, prefill_logits,
                              tiny_int4_engine)
from mtpserve.decoding.config import EngineConfig
from mtpserve.decoding.model import int4_vnni
from mtpserve.decoding.model.int4_format import (INT4_GROUP, int4_codes, int4_mm, int4_pack,
                                                 resolve_int4_kernel)
from mtpserve.decoding.model.linear import Linear, row_invariant

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # the model's N x K

needs_kernel = pytest.mark.skipif(not int4_vnni.available(),
                                  reason="the int4 VNNI kernel does not load here (non-x86, "
                                         "neither AVX512-VNNI nor AVX2+FMA+F16C, or no C++ "
                                         "compiler; see the warning)")
# both paths in this process: an AVX512-VNNI CPU, MTPSERVE_INT4_AVX2 not set
needs_both_paths = pytest.mark.skipif(
    int4_vnni.isa() != 2, reason="comparing the AVX2 path with the AVX-512 one needs an "
                                 "AVX512-VNNI CPU (and MTPSERVE_INT4_AVX2 unset)")
# int8 activations (vpdpbusd): AVX512-VNNI only; an AVX2-only CPU runs int16 ones alone
needs_int8 = pytest.mark.skipif(not int4_vnni.has_int8(),
                                reason="int8 activations (--int4-kernel vnni) need AVX512-VNNI")


def _weights(n: int, k: int, seed: int = 0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    codes, scale, lo = int4_codes(w, INT4_GROUP)
    return codes, scale, lo, int4_vnni.pack(codes, scale, lo)


def _x(m: int, k: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[:, 5] *= 20  # an outlier column, as real activations have
    return x


BITS = [16, pytest.param(8, marks=needs_int8)]  # activation bits: vnni16, vnni
QMAX = {8: 127, 16: 32767}


def _quantize_x(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's activation quantization, in the same fp32 steps: per block of 32,
    d = max|x| / QMAX, q = round-half-even(x * (1/d)) (int16: clamped to +-32767).
    -> q [M, K/32, 32], d [M, K/32]."""
    m, k = x.shape
    b = x.float().reshape(m, k // 32, 32)
    d = b.abs().amax(-1) / QMAX[bits]
    inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    return torch.round(b * inv[..., None]).clamp(-QMAX[bits], QMAX[bits]), d


def _reference(x, codes, scale, lo, bits: int) -> torch.Tensor:
    """fp64: sum over blocks of d_w d_x dot(q_w, q_x) + m_w d_x sum(q_x)."""
    d_w, m_w = (v.double() for v in int4_vnni.kernel_values(scale, lo))
    q, d_x = _quantize_x(x, bits)
    n, k = codes.shape
    dot = torch.einsum("mgk,ngk->mng", q.double(), codes.double().reshape(n, k // 32, 32))
    return (dot * d_w * d_x.double()[:, None] + m_w * (d_x.double() * q.double().sum(-1))[:, None]
            ).sum(-1)


@needs_kernel
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n, k", SHAPES + [(16, 32)])
def test_kernel_matches_the_fp64_reference_of_the_same_integer_math(n, k, bits):
    codes, scale, lo, packed = _weights(n, k)
    for m in (1, 3, 4, 7, 16):
        x = _x(m, k)
        y = int4_vnni.mm(x, packed, n, bits)
        assert y.dtype == torch.float32 and y.shape == (m, n)
        ref = _reference(x, codes, scale, lo, bits)
        # exact integer dots; only the fp32 products and sum over K/32 groups round
        rel = float((y.double() - ref).abs().max() / ref.abs().max())
        assert rel < 1e-5, (m, rel)


@needs_kernel
@pytest.mark.parametrize("bits, rel_range", [(16, (1e-7, 1e-4)),
                                             pytest.param(8, (1e-5, 2e-2), marks=needs_int8)])
@pytest.mark.parametrize("n, k", SHAPES)
def test_kernel_is_within_activation_rounding_of_the_dense_product(n, k, bits, rel_range):
    """Against x @ W_q^T in fp64 (W_q: the dequantized weight as the kernel stores it),
    the only error is rounding x to int16 / int8: |x - d_x q| <= d_x / 2 per element, so
    |y - ref| <= sum over blocks of d_x/2 * sum_k |W_q| (plus fp32 rounding of the
    products and of the sum over K/32 groups: for int16 that is most of the error)."""
    codes, scale, lo, packed = _weights(n, k)
    d_w, m_w = int4_vnni.kernel_values(scale, lo)
    wq = (codes.double().reshape(n, k // 32, 32) * d_w.double()[..., None]
          + m_w.double()[..., None])  # [N, G, 32]
    x = _x(16, k)
    y = int4_vnni.mm(x, packed, n, bits).double()
    ref = x.double() @ wq.reshape(n, k).t()
    _, d_x = _quantize_x(x, bits)
    bound = 0.5 * d_x.double() @ wq.abs().sum(-1).t()  # [M, N]
    # fp32 part: each of 2*K/32 fp32 fmas rounds at most 2^-24 of the running sum's size
    fp32 = 2 ** -23 * (k // 32) * (x.double().abs() @ wq.abs().reshape(n, k).t())
    assert bool(((y - ref).abs() <= bound + fp32).all())
    rel = float((y - ref).norm() / ref.norm())
    lo_, hi_ = rel_range
    assert lo_ < rel < hi_, rel  # it does quantize x (not exact), and not by much


@needs_kernel
@needs_int8
def test_int16_activations_are_far_closer_to_the_dense_product_than_bf16_or_int8():
    """What vnni16 is for: its error against the dense product (W_q as stored, x in fp64)
    is well below PyTorch's bf16-activation kernel's and int8's."""
    n, k = 960, 576
    codes, scale, lo, packed = _weights(n, k)
    lin = _linear(torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.05, "aten")
    d_w, m_w = int4_vnni.kernel_values(scale, lo)
    wq = (codes.double().reshape(n, k // 32, 32) * d_w.double()[..., None]
          + m_w.double()[..., None]).reshape(n, k)
    x = _x(16, k)
    ref = x.double() @ wq.t()

    def rel(y: torch.Tensor, r: torch.Tensor) -> float:
        return float((y.double() - r).norm() / r.norm())

    e16, e8 = rel(int4_vnni.mm(x, packed, n, 16), ref), rel(int4_vnni.mm(x, packed, n, 8), ref)
    # aten against its own stored weights (bf16 scales and zeros): the bf16 activations' error
    s_k, z_k = lin.int4_scales_zeros.float().transpose(0, 1).unbind(-1)
    c2, _, _ = int4_codes(torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.05,
                          INT4_GROUP)
    wa = ((c2.double() - 8).reshape(n, k // 32, 32) * s_k.double()[..., None]
          + z_k.double()[..., None]).reshape(n, k)
    e_bf16 = rel(lin(x), x.double() @ wa.t())
    assert e16 * 20 < e_bf16 and e16 * 100 < e8, (e16, e_bf16, e8)


@needs_kernel
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n, k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_gets_the_same_bits_whatever_the_rows_beside_it(n, k, dtype, bits):
    """Batch invariance (#25): for every M in 1..64 (every tiling of 4-row tiles and
    remainders), row i of an M-row call is bitwise that row computed alone."""
    *_, packed = _weights(n, k)
    x = _x(64, k, seed=2).to(dtype)
    single = torch.cat([int4_vnni.mm(x[i:i + 1], packed, n, bits) for i in range(64)])
    assert single.dtype == dtype
    for m in range(1, 65):
        assert torch.equal(int4_vnni.mm(x[:m], packed, n, bits), single[:m]), m
        assert torch.equal(int4_vnni.mm(x[64 - m:], packed, n, bits), single[64 - m:]), m


@needs_kernel
@pytest.mark.parametrize("bits", BITS)
def test_live_rows_computes_the_leading_rows_alone_and_zeroes_the_padding(bits):
    """A compiled graph's padding rows (int4_vnni.live_rows): the first n rows get their
    bits of the full call, the rest zero; outside the block every row is computed again."""
    n, k = 960, 576
    *_, packed = _weights(n, k)
    x = _x(4, k, seed=3)
    full = int4_vnni.mm(x, packed, n, bits)
    for live in (1, 3):
        with int4_vnni.live_rows(live, 4):
            part = int4_vnni.mm(x, packed, n, bits)
        assert torch.equal(part[:live], full[:live]), live
        assert not part[live:].any(), live
    with int4_vnni.live_rows(4, 4):  # nothing padded: nothing set
        assert torch.equal(int4_vnni.mm(x, packed, n, bits), full)
    assert torch.equal(int4_vnni.mm(x, packed, n, bits), full)  # reset on leaving


@needs_kernel
@pytest.mark.parametrize("bits", BITS)
def test_bf16_output_is_the_fp32_result_rounded(bits):
    *_, packed = _weights(960, 576)
    x = _x(5, 576).bfloat16()
    assert torch.equal(int4_vnni.mm(x, packed, 960, bits),
                       int4_vnni.mm(x.float(), packed, 960, bits).bfloat16())


@needs_kernel
def test_int16_activations_saturate_and_handle_zero_blocks():
    """A block of zeros (d = 0) gives 0, a block whose max is exactly representable maps it
    to +-32767, and nothing wraps around."""
    n, k = 16, 64
    codes = torch.full((n, k), 15, dtype=torch.int32)
    packed = int4_vnni.pack(codes, torch.ones(n, 2), torch.zeros(n, 2))
    x = torch.zeros(2, k)
    x[1, 32:] = torch.linspace(-3.0, 3.0, 32)
    x[1, 40] = -3.0
    y = int4_vnni.mm(x, packed, n, 16)
    assert torch.equal(y[0], torch.zeros(n))
    ref = float(15 * x[1].double().sum())
    assert abs(float(y[1, 0]) - ref) < 1e-3 * 15 * 3


@needs_kernel
@pytest.mark.parametrize("bits", BITS)
def test_the_packing_puts_each_code_where_the_kernel_reads_it(bits):
    """A weight that is one code at one place: the kernel applied to the identity shows it
    at that (row, column) only, for every position of a block (each nibble, byte and vector:
    the int16 path unpacks them into other lanes than the int8 one)."""
    n, k = 32, 64
    for row, col in [((7 * c) % n, c) for c in range(k)] + [(15, 4), (16, 17), (31, 63)]:
        codes = torch.zeros(n, k, dtype=torch.int32)
        codes[row, col] = 9
        packed = int4_vnni.pack(codes, torch.ones(n, k // 32), torch.zeros(n, k // 32))
        seen = int4_vnni.mm(torch.eye(k), packed, n, bits).t()  # [N, K]
        expect = torch.zeros(n, k)
        expect[row, col] = 9
        assert torch.equal(seen, expect), (row, col)


# -- the AVX2 path (int16 activations) -----------------------------------------------------

AVX2, AVX512 = 1, 2  # mm16_isa's isa argument


def _mm16(x: torch.Tensor, packed: torch.Tensor, n: int, isa: int) -> torch.Tensor:
    return torch.ops.mtpserve_int4.mm16_isa(x, packed, n, isa)


def _hard_rows(m: int, k: int, seed: int) -> torch.Tensor:
    """_x plus the rows that test the quantization's corners: a zero block, a block whose
    max is hit exactly, huge and subnormal values, +-inf and NaN (both paths must agree on
    those too: the same max order, conversion and saturation)."""
    x = _x(m, k, seed)
    if m >= 9:
        x[1, :32] = 0
        x[2, -32:] = torch.linspace(-3.0, 3.0, 32)
        x[3] *= 1e30
        x[4] *= 1e-40
        x[5, 7] = float("inf")
        x[6, 9] = -float("inf")
        x[7, 3] = float("nan")  # dropped by the max (MAXPS returns its second operand)...
        x[8, 19] = float("nan")  # ...and kept: where the max's operand order shows
    return x


def _bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal, viewed as integers: NaN equals NaN, and -0.0 is not 0.0."""
    as_int = {torch.float32: torch.int32, torch.bfloat16: torch.int16}
    return a.dtype == b.dtype and torch.equal(a.view(as_int[a.dtype]), b.view(as_int[b.dtype]))


SHAPES_AVX2 = [(1536, 576), (576, 1536), (192, 576), (16, 32), (48, 96), (112, 224)]


@needs_both_paths
@pytest.mark.parametrize("n, k", SHAPES_AVX2)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_avx2_path_is_bitwise_the_avx512_path(n, k, dtype):
    """vpmaddwd (AVX2) vs vpdpwssd (AVX-512): exact integer dots both, then the same fp32
    fma/mul/cvt per lane, and the same activation codes and scales; so the same bits, for
    the model's shapes and others, every tiling of M, fp32 and bf16 in and out."""
    *_, packed = _weights(n, k, seed=n + k)
    x = _hard_rows(33, k, seed=7).to(dtype)
    for m in (1, 2, 3, 4, 5, 7, 8, 16, 33):
        a, b = _mm16(x[:m], packed, n, AVX512), _mm16(x[:m], packed, n, AVX2)
        assert a.dtype == b.dtype == dtype
        assert _bits(a, b), (m, float((a - b).abs().nan_to_num().max()))
    assert _bits(_mm16(x, packed, n, AVX512), int4_vnni.mm(x, packed, n, 16))  # the default


@needs_both_paths
def test_the_avx2_path_quantizes_the_activations_as_the_avx512_path():
    """Through the integer side alone: codes with every nibble value against an identity-like
    x (each output reads single activation codes), so any code, d or order difference in
    quantize_row16_avx2 shows."""
    n, k = 32, 64
    codes = torch.arange(n * k, dtype=torch.int32).reshape(n, k) % 16
    packed = int4_vnni.pack(codes, torch.rand(n, k // 32) + 0.5, torch.rand(n, k // 32) - 0.5)
    x = torch.cat([torch.eye(k), _hard_rows(16, k, seed=3), torch.randn(16, k) * 1e4])
    assert _bits(_mm16(x, packed, n, AVX2), _mm16(x, packed, n, AVX512))


@needs_both_paths
@pytest.mark.parametrize("n, k", [(1536, 576), (576, 1536)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_on_the_avx2_path_a_row_gets_the_same_bits_whatever_the_rows_beside_it(n, k, dtype):
    *_, packed = _weights(n, k)
    x = _x(33, k, seed=2).to(dtype)
    single = torch.cat([_mm16(x[i:i + 1], packed, n, AVX2) for i in range(33)])
    for m in (2, 3, 4, 5, 7, 8, 16, 33):
        assert _bits(_mm16(x[:m], packed, n, AVX2), single[:m]), m
        assert _bits(_mm16(x[33 - m:], packed, n, AVX2), single[33 - m:]), m


@needs_kernel
def test_mm16_isa_refuses_a_path_this_cpu_cannot_run():
    *_, packed = _weights(16, 32)
    with pytest.raises(RuntimeError, match="cannot run isa 3"):
        _mm16(torch.zeros(1, 32), packed, 16, 3)
    with pytest.raises(RuntimeError, match="cannot run isa 0"):
        _mm16(torch.zeros(1, 32), packed, 16, 0)


# -- in Linear ------------------------------------------------------------------------------

def _linear(w: torch.Tensor, kernel: str, wide: bool = False) -> Linear:
    lin = Linear(w.shape[1], w.shape[0], bias=False)
    lin.set_weight(w)
    lin.quantize_int4(wide_copy=wide, kernel=kernel)
    return lin


KERNELS = [("vnni16", 16), pytest.param("vnni", 8, marks=needs_int8)]  # --int4-kernel, bits
KERNEL_NAMES = ["vnni16", pytest.param("vnni", marks=needs_int8)]


@needs_kernel
@pytest.mark.parametrize("kernel, bits", KERNELS)
def test_linear_with_the_vnni_kernel_keeps_only_its_layout_and_meets_the_row_rule(kernel, bits):
    w = torch.randn(192, 576, generator=torch.Generator().manual_seed(3)) * 0.05
    lin = _linear(w, kernel)
    assert lin.weight_format == "int4" and lin.int4_vnni is not None
    assert lin.int4_act_bits == bits
    assert lin.int4_weight is None and lin.int4_scales_zeros is None  # no second copy
    x = _x(6, 576)
    y = lin(x)
    assert y.dtype == torch.float32  # fp32 in, fp32 out: no bf16 round trip
    assert torch.equal(y, int4_vnni.mm(x, lin.int4_vnni, 192, bits))
    assert float((y - x @ w.t()).norm() / (x @ w.t()).norm()) < 0.15  # int4 weights
    assert lin.set_row_invariant()  # the batch-invariant mode accepts it
    assert row_invariant(lin, 576, torch.float32)


@needs_kernel
@pytest.mark.parametrize("kernel, bits", KERNELS)
def test_vnni_layers_keep_no_wide_copy_and_use_the_kernel_at_every_row_count(kernel, bits):
    """A vnni/vnni16 layer drops the bf16 wide copy (2 bytes per weight) even when asked
    for one, and a 64-row pass runs the kernel (int8: faster than the copy at 1..512 rows;
    int16: faster up to ~12 rows, within ~20% beyond, docs/benchmarks.md section 6)."""
    lin = _linear(torch.randn(64, 128, generator=torch.Generator().manual_seed(4)), kernel,
                  wide=True)
    assert lin.wide_weight is None
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(5))
    assert torch.equal(lin(x), int4_vnni.mm(x, lin.int4_vnni, 64, bits))


@needs_kernel
@pytest.mark.parametrize("kernel", KERNEL_NAMES)
def test_a_vnni_packing_read_differently_is_refused_at_load(monkeypatch, kernel):
    swap = torch.arange(128).view(-1, 2).flip(-1).reshape(-1)
    real = int4_vnni.pack
    monkeypatch.setattr(int4_vnni, "pack", lambda c, s, lo: real(c[:, swap].contiguous(), s, lo))
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match="int4 weights on cpu: the int4 VNNI kernel returned "
                                         "values that differ"):
        _linear(w, kernel)


@needs_kernel
@pytest.mark.parametrize("kernel", KERNEL_NAMES)
def test_a_layer_whose_scales_overflow_fp16_keeps_pytorchs_kernel(kernel):
    assert not int4_vnni.supports(40, 64) and not int4_vnni.supports(32, 48)
    big = torch.randn(32, 64)
    big[0, :32] = torch.linspace(-1e6, 1e6, 32)  # min and scale beyond fp16
    assert _linear(big, kernel).int4_weight is not None


def test_aten_kernel_is_todays_path_bit_for_bit():
    """int4_kernel=aten (and every CUDA tensor) keeps PyTorch's kernel with bf16 inputs."""
    w = torch.randn(192, 576, generator=torch.Generator().manual_seed(6)) * 0.05
    lin = _linear(w, "aten")
    assert lin.int4_vnni is None
    codes, scale, lo = int4_codes(w, INT4_GROUP)
    sz = torch.stack([scale, lo + 8 * scale], -1).transpose(0, 1).contiguous().bfloat16()
    x = _x(7, 576)
    today = int4_mm(x.bfloat16(), int4_pack(codes), INT4_GROUP, sz).float()
    assert torch.equal(lin(x), today)
    assert resolve_int4_kernel("aten", "cpu") == "aten"
    assert resolve_int4_kernel("vnni", "meta") == "aten"  # not a CPU: PyTorch's kernels
    assert resolve_int4_kernel("vnni16", "meta") == "aten"
    with pytest.raises(ValueError, match="int4 kernel must be one of"):
        resolve_int4_kernel("fast", "cpu")


def test_int4_kernel_is_validated_and_parsed():
    import argparse

    from mtpserve.decoding.tools.engine_args import add_engine_args, engine_config_from_args

    with pytest.raises(ValueError, match="int4_kernel must be auto\\|aten\\|vnni\\|vnni16"):
        EngineConfig(int4_kernel="fast")
    p = argparse.ArgumentParser()
    add_engine_args(p)
    assert EngineConfig().int4_kernel == p.parse_args([]).int4_kernel == "auto"  # the default
    if int4_vnni.available():
        assert resolve_int4_kernel("auto", "cpu") == "vnni16"
    assert engine_config_from_args(p.parse_args(["--int4-kernel", "aten"])).int4_kernel == "aten"
    assert engine_config_from_args(p.parse_args(["--int4-kernel", "vnni16"])).int4_kernel == \
        "vnni16"


def test_a_kernel_that_cannot_build_means_aten_with_one_warning(monkeypatch, caplog):
    import torch.utils.cpp_extension as ext

    monkeypatch.setattr(int4_vnni._kernel, "loaded", None)
    monkeypatch.setattr(int4_vnni, "cpu_flags", lambda: {"avx512_vnni"})
    monkeypatch.setattr(int4_vnni.platform, "machine", lambda: "x86_64")

    def no_compiler(*a, **kw):
        raise RuntimeError("Error building extension 'mtpserve_int4_vnni': c++: not found\nmore")

    monkeypatch.setattr(ext, "load", no_compiler)
    with caplog.at_level(logging.WARNING, logger=int4_vnni.__name__):
        assert not int4_vnni.available()
        assert not int4_vnni.available()  # tried once per process
    assert len(caplog.records) == 1 and "c++: not found" in caplog.text
    assert resolve_int4_kernel("auto", "cpu") == "aten"
    with pytest.raises(ValueError, match="--int4-kernel vnni: the int4 VNNI kernel cannot run"):
        resolve_int4_kernel("vnni", "cpu")
    with pytest.raises(ValueError, match="--int4-kernel vnni16: the int4 VNNI kernel cannot"):
        resolve_int4_kernel("vnni16", "cpu")
    assert _linear(torch.randn(32, 64), "auto").int4_weight is not None  # and it still works


@pytest.mark.parametrize("machine, flags", [("aarch64", {"avx512_vnni"}), ("x86_64", {"avx2"}),
                                            ("x86_64", {"avx2", "fma"}),
                                            ("x86_64", {"avx512f", "fma", "f16c"})])
def test_no_compile_is_tried_where_the_cpu_cannot_run_it(monkeypatch, machine, flags):
    import torch.utils.cpp_extension as ext

    monkeypatch.setattr(int4_vnni._kernel, "loaded", None)
    monkeypatch.setattr(int4_vnni, "cpu_flags", lambda: flags)
    monkeypatch.setattr(int4_vnni.platform, "machine", lambda: machine)
    monkeypatch.setattr(ext, "load", lambda *a, **kw: pytest.fail("compiled anyway"))
    assert not int4_vnni.available()


@pytest.mark.parametrize("flags", [{"avx2", "fma", "f16c"}, {"avx512_vnni"}])
def test_a_compile_is_tried_where_either_path_can_run(monkeypatch, flags):
    """An AVX2-only CPU (AVX2+FMA+F16C) builds the kernel too: its AVX2 path runs vnni16."""
    import torch.utils.cpp_extension as ext

    tried = []
    monkeypatch.setattr(int4_vnni._kernel, "loaded", None)
    monkeypatch.setattr(int4_vnni, "cpu_flags", lambda: flags)
    monkeypatch.setattr(int4_vnni.platform, "machine", lambda: "x86_64")

    def load(*a, **kw):
        tried.append(kw.get("name"))
        raise RuntimeError("stop here")

    monkeypatch.setattr(ext, "load", load)
    assert not int4_vnni.available()
    assert len(tried) == 1


def test_an_avx2_only_cpu_resolves_auto_to_vnni16_and_refuses_vnni(monkeypatch):
    """On the AVX2 path (no int8-activation kernel) auto and vnni16 mean vnni16; an explicit
    vnni is an error naming the way out, as every explicit kernel that cannot run is."""
    monkeypatch.setattr(int4_vnni, "available", lambda: True)
    monkeypatch.setattr(int4_vnni, "isa", lambda: 1)
    assert resolve_int4_kernel("auto", "cpu") == "vnni16"
    assert resolve_int4_kernel("vnni16", "cpu") == "vnni16"
    assert resolve_int4_kernel("aten", "cpu") == "aten"
    with pytest.raises(ValueError, match="--int4-kernel vnni: int8 activations need "
                                         "AVX512-VNNI.*use --int4-kernel vnni16"):
        resolve_int4_kernel("vnni", "cpu")
    monkeypatch.setattr(int4_vnni, "isa", lambda: 2)
    assert resolve_int4_kernel("vnni", "cpu") == "vnni"


def test_kernels_are_built_into_the_users_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert int4_vnni.cache_dir() == tmp_path / "mtpserve" / "kernels"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert int4_vnni.cache_dir() == tmp_path / "home" / ".cache" / "mtpserve" / "kernels"


# -- through an engine ------------------------------------------------------------------------

@needs_kernel
@pytest.mark.parametrize("kernel", KERNEL_NAMES)
def test_speculative_greedy_equals_plain_greedy_with_the_vnni_kernel(default_engine, kernel):
    """A random model with int4 projections on the VNNI kernel (hidden 64: whole blocks),
    batch-invariant: 64 greedy tokens with speculation (verify passes of several rows)
    are exactly the tokens of one-row steps."""
    tok = default_engine.tokenizer
    eng = tiny_int4_engine(tok, int4_kernel=kernel)
    assert all(m.int4_vnni is not None for m in eng.model.layers.modules()
               if isinstance(m, Linear))
    plain, spec = plain_and_speculative(eng, tok.encode(REPEATING) * 2)
    assert spec.last.spec.num_accepted_draft_tokens > 0  # verify passes did happen
    assert spec.token_ids == plain


def _engine_greedy(tok) -> dict:
    """A random int4 model (hidden 64) on `--int4-kernel auto`, batch-invariant, through an
    engine: the resolved kernel and path, 64 greedy tokens plain and speculative, and a hash
    of one prefill's logits (their bits). Run in this process and in one forced to AVX2."""
    eng = tiny_int4_engine(tok)
    lins = [m for m in eng.model.layers.modules() if isinstance(m, Linear)]
    assert lins and all(m.int4_vnni is not None and m.int4_act_bits == 16 for m in lins)
    prompt = tok.encode(REPEATING) * 2
    plain, spec = plain_and_speculative(eng, prompt)
    logits = prefill_logits(eng.model, prompt).contiguous()
    return {"isa": int4_vnni.isa(), "kernel": resolve_int4_kernel("auto", "cpu"),
            "plain": plain, "spec": spec.token_ids,
            "accepted": spec.last.spec.num_accepted_draft_tokens,
            "logits": hashlib.sha256(logits.numpy().tobytes()).hexdigest()}


@needs_both_paths
def test_the_engine_forced_to_avx2_gives_the_same_greedy_output_and_logits(default_engine):
    """MTPSERVE_INT4_AVX2 in a fresh process (the path is chosen once per process): the
    kernel runs its AVX2 path (int8-activation vnni refused there, auto still vnni16) and a
    random int4 model's greedy tokens, plain and speculative, and its prefill logits' bits
    are this process's (AVX-512)."""
    code = ("import json, sys; sys.path.insert(0, 'tests/decoding');"
            "import pytest, torch; import test_int4_vnni as t;"
            "from mtpserve.decoding.model.checkpoint import default_model_path;"
            "from mtpserve.decoding.model.tokenizer import Tokenizer;"
            "assert t.int4_vnni.isa() == 1 and not t.int4_vnni.has_int8();"
            "e = pytest.raises(ValueError, t.resolve_int4_kernel, 'vnni', 'cpu');"
            "assert 'need AVX512-VNNI' in str(e.value);"
            "e = pytest.raises(RuntimeError, t.int4_vnni.mm, torch.zeros(1, 32), "
            "t._weights(16, 32)[3], 16, 8);"
            "assert 'AVX2 path' in str(e.value);"
            "print(json.dumps(t._engine_greedy(Tokenizer.from_gguf(default_model_path()))))")
    r = fresh_process(code, MTPSERVE_INT4_AVX2="1")
    assert r.returncode == 0, r.stderr[-3000:]
    forced = json.loads(r.stdout.strip().splitlines()[-1])
    here = _engine_greedy(default_engine.tokenizer)
    assert (here["isa"], forced["isa"]) == (2, 1)
    assert here["kernel"] == forced["kernel"] == "vnni16"
    assert forced["accepted"] > 0 and forced["spec"] == forced["plain"]  # verify passes ran
    assert {k: v for k, v in forced.items() if k != "isa"} == \
        {k: v for k, v in here.items() if k != "isa"}
