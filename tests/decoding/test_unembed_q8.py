"""The Q8_0 unembedding (model/q8_unembed.py, `--unembed q8`): the file's own blocks recovered
exactly from the loaded fp32 values; the kernel (int16 activations per block of 32) against
an fp64 product of the same weights and the same int16 activations (fp32 rounding only) and
against the exact product within the bound of the activations' int16 step; a row's bits never
depending on the other rows of the call; the AVX2 path giving the AVX-512 path's bits; the
real model's logits closer to the dense fp32 product than the fp16 copy's; its place in
CausalLM (row rule of the batch-invariant mode, speculative greedy == plain), and fp16 / fp32
unchanged.

Kernel tests are skipped, with the reason, where the kernel cannot load (non-x86, neither
AVX-512 (F, BW, VNNI) nor AVX2, no compiler)."""

from __future__ import annotations

import pytest
import torch

from decoding_helpers import random_causal_lm, tiny_config
from mtpserve.decoding.config import SamplingParams
from mtpserve.decoding.model import q8_unembed
from mtpserve.decoding.model.linear import (fp16_linear, onednn_linear, pack_for_onednn,
                                            pack_fp16, row_invariant)

needs_kernel = pytest.mark.skipif(not q8_unembed.available(),
                                  reason="the Q8 unembedding kernel does not load here (non-x86, "
                                         "neither AVX-512 (F, BW, VNNI) nor AVX2+FMA+F16C, or "
                                         "no C++ compiler; see the warning)")


def _blocks(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random Q8_0 blocks as ggml writes them: q in -127..127 with a +-127 in every block,
    d an fp16 (some blocks all zero)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k // 32, 32), generator=g, dtype=torch.int32)
    q[..., 0] = 127 * (torch.randint(0, 2, (n, k // 32), generator=g) * 2 - 1)
    q[0, 0] = 0
    d = (torch.rand(n, k // 32, generator=g) * 2e-3 + 1e-5).half()
    d[0, 0] = 0  # an all-zero block has d = 0, as ggml writes it
    return q.reshape(n, k).to(torch.int8), d


def _x(m: int, k: int, seed: int = 1) -> torch.Tensor:
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)) * 3
    x[:, 5] *= 20  # an outlier column, as real hidden states have
    return x


def _int16_x(x: torch.Tensor) -> torch.Tensor:
    """x as the kernel multiplies it: per row and block of 32, d = max|x| / 32767 (fp32),
    code = round-half-even(x * (1/d)) saturated to +-32767, value = code * d."""
    b = x.float().reshape(x.shape[0], -1, 32)
    d = b.abs().amax(-1) / 32767
    inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    codes = torch.round(b * inv[..., None]).clamp(-32767, 32767)
    return (codes.double() * d.double()[..., None]).reshape(x.shape)


def _int16_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """[M, N] bound on |kernel - exact x @ w^T|: each x moves by at most 0.5 * d (the int16
    step; 0.51 covers x * (1/d) being rounded in fp32 before the code is), so a logit by at
    most sum over blocks of 0.51 * d_x * sum |w| in the block; plus the fp32 rounding of the
    int32 -> fp32 dots, the scales and 18 fma (2e-6 of sum |x| |w|)."""
    m, k = x.shape
    d = x.double().reshape(m, k // 32, 32).abs().amax(-1) / 32767
    wsum = w.double().abs().reshape(w.shape[0], k // 32, 32).sum(-1)
    return 0.51 * d @ wsum.t() + 2e-6 * (x.double().abs() @ w.double().abs().t())


def _q8_logits_of(model, h: torch.Tensor) -> torch.Tensor:
    q, d = q8_unembed.recover(model.unembed_weight())
    return q8_unembed.mm(h, q8_unembed.pack(q, d), model.config.vocab_size)


# -- recovery ------------------------------------------------------------------------------
def test_recovery_of_the_default_models_unembedding_is_bitwise(default_engine):
    """The embedded GGUF stores token_embd as Q8_0: the loaded fp32 tensor (gguf-py's
    dequantization) splits back into int8 values and fp16 scales that give every value
    bitwise, including the sign of zeros."""
    w = default_engine.model.unembed_weight().detach()
    blocks = q8_unembed.recover(w)
    assert blocks is not None
    q, d = blocks
    assert q.dtype == torch.int8 and d.dtype == torch.float16
    assert q.shape == w.shape and d.shape == (w.shape[0], w.shape[1] // 32)
    assert int(q.abs().max()) == 127 and int((q.reshape(-1, 32).abs().amax(-1) == 127).sum()) > 0
    back = q8_unembed.dequantize(q, d)
    assert torch.equal(back.view(torch.int32), w.view(torch.int32))


def test_recovery_refuses_what_is_not_q8_0():
    q, d = _blocks(64, 128)
    w = q8_unembed.dequantize(q, d)
    got = q8_unembed.recover(w)
    assert got is not None and torch.equal(got[0], q) and torch.equal(got[1], d)
    nudged = w.clone()
    nudged[3, 70] = torch.nextafter(nudged[3, 70], torch.tensor(1.0))  # one ulp off the grid
    assert q8_unembed.recover(nudged) is None
    assert q8_unembed.recover(torch.randn(64, 128)) is None  # dense float values
    neg0 = w.clone()
    neg0[0, :32] = -0.0  # the all-zero block: -0.0 is not d * 0
    assert q8_unembed.recover(neg0) is None
    assert q8_unembed.recover(w[:, :100]) is None  # K not in 32s
    assert q8_unembed.recover(w.double()) is None


# -- the kernel ----------------------------------------------------------------------------
@needs_kernel
@pytest.mark.parametrize("n, k", [(49152, 576), (4096, 576), (48, 64)])
def test_kernel_is_the_int16_activations_product_and_within_the_int16_bound(n, k):
    """Against fp64 of the same weights and the same int16 activations: fp32 rounding only
    (the integer dots are exact). Against the exact product of x: within _int16_bound, which
    the error also nearly reaches (a bound of the right size, not a loose one)."""
    q, d = _blocks(n, k)
    w = q8_unembed.dequantize(q, d)
    packed = q8_unembed.pack(q, d)
    for m in (1, 3, 4, 9):
        x = _x(m, k)
        if m == 9:
            x[2] = 0  # d = 0: all-zero codes, zero logits
            x[4, 32:64] = 0  # one zero block
            x[5, :32] *= 1e-30  # a tiny block: its own scale, not lost
        got = q8_unembed.mm(x, packed, n)
        assert got.dtype == torch.float32 and got.shape == (m, n)
        xq = _int16_x(x)
        scale = xq.abs() @ w.double().abs().t()  # the sum's magnitude
        rel = float(((got.double() - xq @ w.double().t()).abs() / scale.clamp(min=1e-300)).max())
        assert rel < 2e-6, (m, rel)
        err = (got.double() - x.double() @ w.double().t()).abs()
        bound = _int16_bound(x, w)
        ratio = float((err / bound)[bound > 0].max())
        assert bool((err <= bound).all()), (m, ratio)
        assert ratio > 0.05, (m, ratio)
        if m == 9:
            assert bool((got[2] == 0).all())


@needs_kernel
def test_a_nan_in_a_row_makes_that_rows_logits_nan_only():
    n, k = 256, 576
    q, d = _blocks(n, k, seed=7)
    packed = q8_unembed.pack(q, d)
    x = _x(3, k)
    x[1, 100] = float("nan")
    got = q8_unembed.mm(x, packed, n)
    assert bool(got[1].isnan().all())
    assert torch.equal(got[[0, 2]], q8_unembed.mm(x[[0, 2]], packed, n))


@needs_kernel
@pytest.mark.parametrize("n,rows,ms,seed", [
    (1024, 64, range(1, 65), 2),                 # every M from 1 to 64
    (49152, 33, (*range(1, 10), 16, 33), 8),     # the model's unembedding shape
])
def test_a_rows_logits_never_depend_on_the_other_rows(n, rows, ms, seed):
    """Row i of an M-row call is bitwise row i alone, and a shuffled call gives the rows'
    own logits in its order."""
    k = 576
    q, d = _blocks(n, k, seed=seed)
    packed = q8_unembed.pack(q, d)
    x = _x(rows, k, seed=seed + 1)
    alone = torch.cat([q8_unembed.mm(x[i:i + 1], packed, n) for i in range(rows)])
    for m in ms:
        assert torch.equal(q8_unembed.mm(x[:m], packed, n), alone[:m]), m
    shuffled = torch.randperm(rows, generator=torch.Generator().manual_seed(0))
    assert torch.equal(q8_unembed.mm(x[shuffled], packed, n), alone[shuffled])


@needs_kernel
def test_the_avx2_path_gives_the_avx512_paths_bits():
    """vpmaddwd + vpaddd on two ymm halves against vpdpwssd on one zmm: the same int32 dots,
    the same per-lane cvt, mul and fma, so the same bits (mm_isa runs either path)."""
    if torch.ops.mtpserve_q8.isa() < 2:
        pytest.skip("this CPU has no AVX-512 (F, BW, VNNI): only the AVX2 path runs")
    n, k = 2048, 576
    q, d = _blocks(n, k, seed=4)
    packed = q8_unembed.pack(q, d)
    for m in (1, 2, 3, 4, 5, 9, 16, 33):
        x = _x(m, k, seed=m)
        x[0, :32] *= 1e-3  # blocks of other scales
        x[-1, 64:96] = 0
        want = q8_unembed.mm(x, packed, n)
        assert torch.equal(torch.ops.mtpserve_q8.mm_isa(x, packed, n, 2), want)
        assert torch.equal(torch.ops.mtpserve_q8.mm_isa(x, packed, n, 1), want), m


# -- the real model ------------------------------------------------------------------------
@needs_kernel
def test_real_logits_are_closer_to_dense_fp32_than_the_fp16_copys(default_engine):
    """Real hidden states of the default model at every position of two chat prompts: the
    q8 logits within the int16 activations' bound (_int16_bound) of the exact product of
    the file's values and within 5e-3 (measured 1.8e-3: the int16 step of the activations;
    fp32 activations were ~5e-6 off), at least 5x closer than the fp16 copy's (measured
    ~0.02-0.03), and the same argmax."""
    from decoding_helpers import chat, prefill_hidden

    model, tok = default_engine.model, default_engine.tokenizer
    seqs = [chat(tok, "Write a Python function that merges two sorted lists."),
            chat(tok, "Explain what a hash map is in two sentences.")]
    hs, _ = prefill_hidden(model, seqs)
    h = torch.cat(hs)
    w = model.unembed_weight().detach()
    ref = h.double() @ w.double().t()
    q8 = _q8_logits_of(model, h)
    packed16 = pack_fp16(w)
    if packed16 is None:
        pytest.skip("this PyTorch build has no FBGEMM fp16 GEMM to compare with")
    fp16 = fp16_linear(h, packed16)
    err_q8 = float((q8.double() - ref).abs().max())
    err_16 = float((fp16.double() - ref).abs().max())
    assert bool(((q8.double() - ref).abs() <= _int16_bound(h, w)).all())
    assert err_q8 < 5e-3, err_q8
    assert err_q8 * 5 < err_16, (err_q8, err_16)
    assert torch.equal(q8.argmax(-1), ref.argmax(-1))


@needs_kernel
def test_speculative_greedy_equals_plain_with_the_q8_unembedding(default_engine):
    """The shared dense fp32 engine switched to the q8 unembedding (then back): verify
    passes and one-row steps agree token for token (a row's logits the same in a pass of
    one row or of many), and the batch-invariant mode's row rule holds for it."""
    from decoding_helpers import chat

    eng, model = default_engine, default_engine.model
    prompts = [chat(eng.tokenizer, t) for t in ("List three colors.",
                                                 "Write a haiku about the sea.")]
    prompts.append(eng.tokenizer.encode("one two three one two three one two three one two"))
    assert model.unembed_format == "dense"

    def greedy(speculate: bool) -> SamplingParams:
        return SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True,
                              speculate=speculate)

    assert model.use_q8_unembedding()
    try:
        assert model.unembed_format == "q8" and model.unembed_packed is None
        model.use_transposed_weights()  # keeps no fp32 copy for the logits
        assert model.unembed_packed is None and model.unembed_t is None
        assert row_invariant(model.compute_logits, model.config.hidden_size, torch.float32)
        plain = [r["token_ids"] for r in eng.generate(prompts, greedy(False))]
        spec = eng.generate(prompts, greedy(True))
    finally:
        model.unembed_q8 = None
        model.use_transposed_weights()  # the fp32 packed copy back, as the engine built it
    assert model.unembed_format == "dense" and model.unembed_packed is not None
    assert sum(r["spec"].num_accepted_draft_tokens for r in spec) > 0
    assert [r["token_ids"] for r in spec] == plain


# -- CausalLM ------------------------------------------------------------------------------
def _q8_tiny_model(seed: int = 5):
    model = random_causal_lm(tiny_config(vocab=320, hidden=64), dtype=torch.float32, seed=seed)
    q, d = _blocks(320, 64, seed=seed)
    model.embed_tokens.weight.data.copy_(q8_unembed.dequantize(q, d))
    return model


@needs_kernel
def test_tiny_model_q8_unembedding_keeps_no_fp32_logits_copy_and_passes_the_row_rule():
    model = _q8_tiny_model()
    w = model.unembed_weight().detach().clone()
    assert model.use_q8_unembedding()
    model.use_transposed_weights()
    assert model.unembed_format == "q8"
    assert model.unembed_packed is None and model.unembed_t is None and model.unembed_fp16 is None
    assert torch.equal(model.unembed_weight(), w)  # the lookup's fp32 rows stay
    h = _x(7, 64)
    got = model.compute_logits(h)
    assert got.dtype == torch.float32 and got.shape == (7, 320)
    err = (got.double() - h.double() @ w.double().t()).abs()
    assert bool((err <= _int16_bound(h, w)).all())  # int16 activations, the file's weights
    assert "unembedding" not in model.set_batch_invariant(True)


def test_q8_is_refused_where_the_values_or_the_kernel_are_not_there(monkeypatch):
    model = random_causal_lm(tiny_config(vocab=320, hidden=64), dtype=torch.float32, seed=6)
    assert not model.use_q8_unembedding()  # random fp32 values are no Q8_0 tensor
    assert model.unembed_format == "dense"
    model = _q8_tiny_model()
    monkeypatch.setattr(q8_unembed._kernel, "loaded", False)
    assert not model.use_q8_unembedding()
    assert model.unembed_format == "dense"


def test_fp16_and_fp32_unembeddings_are_unchanged_bitwise(default_engine):
    """--unembed fp32 (what a dense engine's auto means) is oneDNN's packed fp32 product and
    --unembed fp16 FBGEMM's over the fp16 copy, bit for bit, as before q8 existed."""
    from decoding_helpers import chat, prefill_hidden

    model = default_engine.model
    assert model.unembed_format == "dense" and model.unembed_q8 is None
    (h,), _ = prefill_hidden(model, [chat(default_engine.tokenizer, "Name a prime number.")])
    w = model.unembed_weight().detach()
    packed = pack_for_onednn(w, batch_hint=16)
    if packed is not None:
        for rows in (h[:1], h):
            assert torch.equal(model.compute_logits(rows), onednn_linear(rows, packed))
    if not model.use_fp16_unembedding():
        pytest.skip("this PyTorch build has no FBGEMM fp16 GEMM")
    try:
        assert model.unembed_format == "fp16"
        want = fp16_linear(h, pack_fp16(w))
        assert torch.equal(model.compute_logits(h), want)
    finally:
        model.unembed_fp16 = None
        model.use_transposed_weights()
    assert model.unembed_format == "dense" and model.unembed_packed is not None
