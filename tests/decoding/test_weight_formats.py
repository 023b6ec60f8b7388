"""Weight-only int8 / int4 formats: what they compute, that a row's result does not depend
on the rows beside it, and that int4 recovers GGUF Q4_1 blocks instead of re-quantizing."""

from __future__ import annotations

import copy

import pytest
import torch

from decoding_helpers import prefill_logits, random_causal_lm, tiny_config, tiny_int4_engine
from mtpserve.decoding.config import EngineConfig, SamplingParams
from mtpserve.decoding.model.int4_format import INT4_GROUP, int4_codes
from mtpserve.decoding.model.linear import Linear, unpack_onednn


def _q4_1_like(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight that is exactly d*q + m per group of 32, as llama.cpp's Q4_1 stores it
    (each group holds its minimum, code 0, and its maximum, code 15)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=g)
    codes[:, 0::INT4_GROUP] = 0
    codes[:, 1::INT4_GROUP] = 15
    d = torch.rand(n, k // INT4_GROUP, generator=g) * 0.01 + 0.001
    m = -torch.rand(n, k // INT4_GROUP, generator=g) * 0.1
    w = codes.reshape(n, k // INT4_GROUP, INT4_GROUP) * d[..., None] + m[..., None]
    return w.reshape(n, k), codes


def _linear(w: torch.Tensor) -> Linear:
    lin = Linear(w.shape[1], w.shape[0], bias=False)
    lin.set_weight(w)
    return lin


def test_int4_recovers_q4_1_codes_and_matches_the_dense_matmul():
    w, codes = _q4_1_like(96, 128)
    got_codes, _, _ = int4_codes(w, INT4_GROUP)
    assert torch.equal(got_codes, codes.to(torch.int32))
    lin = _linear(w)
    lin.quantize_int4()
    assert lin.weight_format == "int4" and lin.weight.numel() == 0  # dense copy freed
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(1))
    ref = x @ w.t()
    # Only bf16 rounding of the activations and of scale/zero remains (no 4-bit error).
    err = (lin(x) - ref).norm() / ref.norm()
    assert err < 1e-2, err


def test_int8_is_close_to_dense_and_int4_is_coarser_on_gaussian_weights():
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(2)) * 0.05
    x = torch.randn(4, 96, generator=torch.Generator().manual_seed(3))
    ref = x @ w.t()
    errs = {}
    for fmt in ("int8", "int4"):
        lin = _linear(w)
        getattr(lin, f"quantize_{fmt}")()
        y = lin(x)
        assert y.dtype == x.dtype and y.shape == ref.shape
        errs[fmt] = float((y - ref).norm() / ref.norm())
    assert errs["int8"] < 0.02 and 0.02 < errs["int4"] < 0.15, errs


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_rows_do_not_depend_on_their_neighbours(fmt):
    """A verify pass over k rows must give each row what a single-row step gives it."""
    lin = _linear(torch.randn(160, 64, generator=torch.Generator().manual_seed(4)))
    getattr(lin, f"quantize_{fmt}")()
    x = torch.randn(17, 64, generator=torch.Generator().manual_seed(5))
    single = torch.cat([lin(x[i:i + 1]) for i in range(len(x))])
    for m in (2, 5, 8, 17):
        assert torch.equal(lin(x[:m]), single[:m]), m


def test_int4_needs_whole_groups():
    lin = _linear(torch.randn(8, 48))
    with pytest.raises(ValueError, match="divisible by 32"):
        lin.quantize_int4()


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_model_logits_stay_close_to_dense(fmt):
    model = random_causal_lm(tiny_config(vocab=128, hidden=64), dtype=torch.float32, seed=3)
    ids = list(range(5, 40))
    ref = prefill_logits(model, ids)
    q = copy.deepcopy(model)
    q.quantize(fmt)
    got = prefill_logits(q, ids)
    assert got.dtype == torch.float32
    rel = float((got - ref).norm() / ref.norm())
    assert rel < (0.05 if fmt == "int8" else 0.2), rel
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > (0.9 if fmt == "int8" else 0.6)


def test_weights_flag_is_validated():
    with pytest.raises(ValueError, match="auto\\|dense\\|int8\\|int4"):
        EngineConfig(weights="int3")


def test_auto_serves_q4_gguf_as_int4_on_cpu_only():
    from mtpserve.decoding.model.device import resolve_weights

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_weights("auto", cpu, "Q4_1") == "int4"
    assert resolve_weights("auto", cpu, "Q4_0") == "int4"
    assert resolve_weights("auto", cpu, "Q8_0") == "dense"
    assert resolve_weights("auto", cpu, None) == "dense"  # HF folders: no silent quantizing
    assert resolve_weights("auto", cuda, "Q4_1") == "dense"
    assert resolve_weights("int8", cpu, None) == "int8"


def test_auto_dtype_on_cpu_is_fp32_around_quantized_weights(monkeypatch):
    """int4/int8 kernels take bf16 inputs either way; around them the engine computes in
    fp32 even where the CPU has native bf16. Dense weights use bf16 only there."""
    from mtpserve.decoding.model import device

    cpu = torch.device("cpu")
    for native in (True, False):
        monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: native)
        assert device.resolve_dtype("auto", cpu, "int4") == torch.float32
        assert device.resolve_dtype("auto", cpu, "int8") == torch.float32
        assert device.resolve_dtype("auto", cpu, "dense") == (
            torch.bfloat16 if native else torch.float32)
        assert device.resolve_dtype("bfloat16", cpu, "int4") == torch.bfloat16  # asked for


@pytest.fixture(scope="module")
def int4_engine():
    from mtpserve.decoding.config import SpecConfig
    from mtpserve.decoding.engine.llm_engine import LLMEngine

    return LLMEngine.from_config(EngineConfig(max_num_seqs=2, max_model_len=512,
                                              spec=SpecConfig(mode="on", proposer="ngram")))


def test_default_model_int4_engine_agrees_with_dense_fp32(default_engine, int4_engine):
    """The embedded Q4_1 file served with its own int4 codes: the same next-token choice
    as the dense fp32 oracle engine at nearly every position of a real chat prompt."""
    from decoding_helpers import chat

    eng = int4_engine
    assert eng.weight_format == "int4" and default_engine.weight_format == "dense"
    assert eng.dtype == torch.float32  # auto: fp32 around the int4 kernels
    ids = chat(eng.tokenizer, "Write a Python function that returns the n-th Fibonacci number.")
    ids = ids + default_engine.generate([ids], _greedy(48))[0]["token_ids"]
    ref = prefill_logits(default_engine.model, ids)
    got = prefill_logits(eng.model, ids)
    agree = (ref.argmax(-1) == got.argmax(-1)).float().mean()
    assert agree > 0.9, agree
    assert float((got - ref).norm() / ref.norm()) < 0.1


def test_int4_speculative_greedy_leaves_plain_only_at_near_ties(int4_engine):
    """bf16 kernel inputs make a k-row verify round differently from one-row steps, so
    speculative greedy may leave plain greedy's path, but only where plain's top two
    tokens are nearly tied: a large margin there would be a bookkeeping bug."""
    from decoding_helpers import chat

    eng = int4_engine
    prompts = [chat(eng.tokenizer, t) for t in (
        "Write a Python function that reverses a list, with a docstring and tests.",
        "List the planets of the solar system in order, one per line, with a fact each.")]
    plain = [r["token_ids"] for r in eng.generate(prompts, _greedy(40, speculate=False))]
    spec_runs = eng.generate(prompts, _greedy(40, speculate=True))
    assert sum(r["spec"].num_accepted_draft_tokens for r in spec_runs) > 0  # it did speculate
    for p, a, r in zip(prompts, plain, spec_runs):
        b = r["token_ids"]
        d = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if d is None:
            assert a == b
            continue
        out = eng.generate([p + a[:d]], SamplingParams(max_tokens=1, temperature=0.0,
                                                       logprobs=2, speculate=False))
        del out  # logprobs come through step outputs; recompute the margin directly:
        logits = prefill_logits(eng.model, p + a[:d])[-1]
        top2 = logits.log_softmax(-1).topk(2).values
        assert float(top2[0] - top2[1]) < 0.05, (d, top2)


def test_int4_engine_logits_come_from_the_q8_or_fp16_unembedding(int4_engine):
    """Around the int4 trunk the logits read the file's own Q8_0 blocks through the q8
    kernel where it runs (exactly the file's values, int16 activations: within 5e-3 of the
    fp32 product, measured ~2e-3), else an fp16 copy through FBGEMM (within 0.05, measured 0.02;
    per-channel int8 weights were 0.9 off); no fp32 copy for the logits either way;
    float32 for one row and for many, and a row's logits the same bits whichever rows
    share the pass (verify == single-token steps)."""
    from decoding_helpers import chat, prefill_hidden
    from mtpserve.decoding.model import q8_unembed

    model = int4_engine.model
    want = "q8" if q8_unembed.available() else "fp16"
    assert model.unembed_format == want and model.unembed_packed is None
    assert model.unembed_t is None
    ids = chat(int4_engine.tokenizer, "Write a Python function that merges two sorted lists.")
    (h,), _ = prefill_hidden(model, [ids])
    ref = h.double() @ model.unembed_weight().detach().double().t()
    many = model.compute_logits(h)
    one = torch.cat([model.compute_logits(h[i:i + 1]) for i in range(len(h))])
    assert many.dtype == one.dtype == torch.float32 and many.shape == ref.shape
    err = float((many.double() - ref).abs().max())
    if want == "q8":
        assert err < 5e-3, err
    else:
        assert 1e-4 < err < 0.05, err  # fp16 weights, not the fp32 ones; and no coarser
    assert torch.equal(many, one)
    assert torch.equal(many.argmax(-1), ref.argmax(-1))


def test_fp16_unembedding_on_a_tiny_model_keeps_no_fp32_logits_copy():
    model = random_causal_lm(tiny_config(vocab=300, hidden=64), dtype=torch.float32, seed=3)
    if not model.use_fp16_unembedding():
        pytest.skip("this PyTorch build has no FBGEMM fp16 GEMM")
    model.use_transposed_weights()
    assert model.unembed_packed is None and model.unembed_t is None
    h = torch.randn(7, 64, generator=torch.Generator().manual_seed(0))
    w16 = model.unembed_weight().half().double()
    for n in (1, 7):
        got = model.compute_logits(h[:n])
        assert got.dtype == torch.float32 and got.shape == (n, 300)
        torch.testing.assert_close(got.double(), h[:n].double() @ w16.t(), rtol=1e-5, atol=1e-5)


def test_unembed_flag_is_validated():
    with pytest.raises(ValueError, match="unembed"):
        EngineConfig(unembed="int8")
    assert EngineConfig(unembed="q8").unembed == "q8"


def test_speculative_greedy_equals_plain_with_the_fp16_unembedding(default_engine):
    """The shared dense fp32 engine switched to the fp16 unembedding (then back): its
    verify passes and one-row steps still agree token for token, since the fp16 kernel
    gives a row the same logits in a pass of one row or of many."""
    from decoding_helpers import chat

    eng, model = default_engine, default_engine.model
    prompts = [chat(eng.tokenizer, t) for t in ("List three colors.",
                                                 "Write a haiku about the sea.")]
    prompts.append(eng.tokenizer.encode("one two three one two three one two three one two"))
    assert model.unembed_format == "dense"
    if not model.use_fp16_unembedding():
        pytest.skip("this PyTorch build has no FBGEMM fp16 GEMM")
    try:
        assert model.unembed_format == "fp16"
        plain = [r["token_ids"] for r in eng.generate(prompts, _greedy(24, speculate=False))]
        spec = eng.generate(prompts, _greedy(24, speculate=True))
    finally:
        model.unembed_fp16 = None
        model.use_transposed_weights()  # the fp32 packed copy back, as the engine built it
    assert model.unembed_format == "dense" and model.unembed_packed is not None
    assert sum(r["spec"].num_accepted_draft_tokens for r in spec) > 0
    assert [r["token_ids"] for r in spec] == plain


def _greedy(n: int, speculate: bool = False) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, speculate=speculate)


def test_bf16_engine_on_cpu_attends_over_an_fp32_kv_cache(default_engine):
    """CPU flash attention repacks bf16 K/V on every call, so a bf16 engine on CPU keeps
    its cache in fp32: K/V are stored exactly (bf16 -> fp32 is lossless), attention runs in
    fp32 and hands back bf16, and the engine still decodes."""
    from decoding_helpers import tiny_engine
    from mtpserve.decoding.model.attention import AttentionMetadata, attend
    from mtpserve.decoding.model.device import kv_cache_dtype

    cpu = torch.device("cpu")
    assert kv_cache_dtype(torch.bfloat16, cpu) == torch.float32
    assert kv_cache_dtype(torch.float64, cpu) == torch.float64
    assert kv_cache_dtype(torch.bfloat16, torch.device("cuda")) == torch.bfloat16

    eng = tiny_engine(default_engine.tokenizer, dtype=torch.bfloat16)
    assert eng.dtype == torch.bfloat16 and eng.kv.buf.dtype == torch.float32
    ids = default_engine.tokenizer.encode("The capital of France is")
    out = eng.generate([ids], _greedy(6))[0]
    assert len(out["token_ids"]) == 6
    # the prompt's K/V went in exactly as the bf16 layer computed them
    assert bool((eng.kv.buf[0, :, 0, :, :len(ids)] == eng.kv.buf[0, :, 0, :, :len(ids)]
                 .bfloat16().float()).all())

    g = torch.Generator().manual_seed(0)
    q = torch.randn(5, 4, 8, generator=g).bfloat16()
    k, v = (torch.randn(1, 2, 5, 8, generator=g) for _ in range(2))
    meta = AttentionMetadata(positions=torch.arange(5), token_slots=torch.zeros(5, dtype=torch.long),
                             token_store=torch.arange(5), seq_slots=torch.zeros(1, dtype=torch.long),
                             slot_start=0, kv_len=5, num_seqs=1, q_len=5, q_gather=None,
                             q_scatter=None, mask=torch.ones(5, 5, dtype=torch.bool).tril()[None, None])
    got = attend(q, k, v, meta, scale=8 ** -0.5)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.float().view(1, 5, 4, 8).transpose(1, 2), k, v, attn_mask=meta.mask, scale=8 ** -0.5,
        enable_gqa=True).transpose(1, 2).reshape(5, 4, 8)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, ref.bfloat16())


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_wide_copy_holds_the_kernels_own_values(fmt):
    """Passes of WIDE_ROWS+ rows multiply by a bf16 copy of the quantized weight: it must
    hold the values the kernel multiplies by (not the unquantized ones), so a row's
    result is the same whether it rides in a wide pass or a narrow one."""
    from mtpserve.decoding.model.linear import WIDE_ROWS

    w, _ = _q4_1_like(64, 128, seed=3)
    lin = Linear(128, 64, bias=False)
    dense = w + 0.05 * torch.randn(64, 128, generator=torch.Generator().manual_seed(4))
    lin.set_weight(dense)  # not exactly Q4_1: quantizing changes it
    lin.quantize_int4(wide_copy=True) if fmt == "int4" else lin.quantize_int8(wide_copy=True)
    if lin.wide_weight is None:
        pytest.skip("this PyTorch build has no oneDNN packed linear")
    assert lin.wide_weight.dtype == torch.bfloat16
    values = unpack_onednn(lin.wide_weight, lin.in_features)
    eye = torch.eye(128, dtype=torch.bfloat16)
    if fmt == "int4":  # the kernel applied to the identity: W^T as the kernel sees it
        seen = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, lin.int4_weight, lin.int4_group,
                                                          lin.int4_scales_zeros)
    else:
        seen = torch.ops.aten._weight_int8pack_mm(eye, lin.int8_weight, lin.int8_scales)
    torch.testing.assert_close(values.float(), seen.t().float(), rtol=2 ** -8, atol=0)
    x = torch.randn(WIDE_ROWS + 3, 128)
    wide = lin(x)  # one pass of many rows: the bf16 copy
    narrow = torch.cat([lin(x[i:i + 4]) for i in range(0, len(x), 4)])  # the kernel
    assert wide.dtype == torch.float32
    rel = float((wide - narrow).norm() / narrow.norm())
    assert rel < 1e-2, rel
    assert float((wide - x @ dense.t()).norm() / (x @ dense.t()).norm()) > 2 * rel  # quantized


def test_logits_of_many_rows_from_the_packed_unembedding_match_one_row_logits():
    """CPU fp32: logits of every row count come from oneDNN's prepacked copy of the
    unembedding (the only copy besides the embedding table): the product to fp32 rounding,
    and a row's logits do not depend on the pass it rides in."""
    model = random_causal_lm(tiny_config(vocab=300, hidden=64), dtype=torch.float32, seed=2)
    model.use_transposed_weights()
    if model.unembed_packed is None:
        pytest.skip("this PyTorch build has no oneDNN packed linear")
    h = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    ref = (h.double() @ model.unembed_weight().double().t())
    many = model.compute_logits(h)
    one = torch.cat([model.compute_logits(h[i:i + 1]) for i in range(5)])
    assert many.dtype == torch.float32 and many.shape == (5, 300)
    torch.testing.assert_close(many.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(many, one, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_dense_linear_in_onednn_layout_computes_the_same_product(bias, dtype):
    """CPU fp32 and bf16 projections are stored in oneDNN's packed layout (the dense copy
    dropped): the product, bias included, is the one F.linear computes, for 2-D and 3-D
    inputs, and dense_weight() gives the weight back bit for bit (heads start from it)."""
    lin = Linear(96, 40, bias=bias)
    g = torch.Generator().manual_seed(5)
    lin.set_weight(torch.randn(40, 96, generator=g))
    if bias:
        lin.set_bias(torch.randn(40, generator=g))
    lin.to(dtype)
    ref_w, ref_b = lin.weight.detach().clone(), None if lin.bias is None else lin.bias.detach().clone()
    lin.transpose_storage()
    if lin.packed_weight is None:
        pytest.skip("this PyTorch build has no oneDNN packed linear")
    assert lin.weight.numel() == 0 and lin.weight_t is None  # no second copy kept
    assert torch.equal(lin.dense_weight(), ref_w)
    tol = 2 ** -7 if dtype == torch.bfloat16 else 1e-5
    for shape in [(1, 96), (7, 96), (2, 3, 96)]:
        x = torch.randn(*shape, generator=g).to(dtype)
        got = lin(x)
        want = torch.nn.functional.linear(x, ref_w, ref_b)
        assert got.shape == want.shape and got.dtype == dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_streamed_bytes_count_projections_in_the_packed_layout(dtype):
    """The bench's weight-streaming limit counts every projection once, whether it is a
    parameter or (on CPU) a oneDNN-packed copy that replaced it, and the unembedding once,
    from the copy the logits read (bf16: [H, V]; fp32: oneDNN-packed)."""
    from mtpserve.decoding.tools.bench.memory import model_bytes

    model = random_causal_lm(tiny_config(vocab=300, hidden=64), dtype=dtype, seed=1)
    before = model_bytes(model)
    model.use_transposed_weights()
    if model.layers[0].mlp.down_proj.packed_weight is None:
        pytest.skip("this PyTorch build has no oneDNN packed linear")
    # the logits' copy replaces the embedding table in the count; the projections stay
    assert (model.unembed_packed is None) == (dtype == torch.bfloat16)
    assert (model.unembed_t is None) == (dtype == torch.float32)  # one extra copy, not two
    assert model_bytes(model) == before


def test_onednn_passes_run_at_a_bounded_set_of_row_counts():
    """oneDNN caches a primitive (~1 MB here) per input shape: row counts are bucketed so a
    server seeing every prompt length keeps a bounded set, at most 25% padding, exact
    counts for decode and verify passes (<= 16 rows)."""
    from mtpserve.decoding.model.linear import bucket_rows

    buckets = {bucket_rows(m) for m in range(1, 2049)}
    assert len(buckets) <= 44
    assert all(bucket_rows(m) == m for m in range(1, 17))
    assert all(m <= bucket_rows(m) <= 1.25 * m for m in range(1, 2049))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_onednn_pass_gives_each_row_its_own_product(dtype):
    """A pass padded to its bucket returns exactly its own rows: the zero rows added do not
    leak into the result or its shape (17, 33 and 300 rows pad to 20, 40 and 320)."""
    lin = Linear(64, 24, bias=True)
    g = torch.Generator().manual_seed(3)
    lin.set_weight(torch.randn(24, 64, generator=g))
    lin.set_bias(torch.randn(24, generator=g))
    lin.to(dtype)
    ref_w, ref_b = lin.weight.detach().clone(), lin.bias.detach().clone()
    lin.transpose_storage()
    if lin.packed_weight is None:
        pytest.skip("this PyTorch build has no oneDNN packed linear")
    tol = 2 ** -7 if dtype == torch.bfloat16 else 1e-5
    for m in (17, 33, 300):
        x = torch.randn(m, 64, generator=g).to(dtype)
        got = lin(x)
        assert got.shape == (m, 24)
        torch.testing.assert_close(got.float(), torch.nn.functional.linear(x, ref_w, ref_b).float(),
                                   rtol=tol, atol=tol)


# -- the kernel self-check and the CUDA packing -----------------------------------------

@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_a_kernel_that_reads_the_packing_differently_is_refused_at_load(fmt, monkeypatch):
    """Each quantized layer multiplies unit vectors through its kernel at load and compares
    with the quantized values: a packing the kernel reads in another order (here: input
    columns swapped in pairs, what a wrong nibble order does) is a clear error."""
    from mtpserve.decoding.model import int4_format

    w, _ = _q4_1_like(64, 128, seed=5)
    _linear(w).quantize_int4() if fmt == "int4" else _linear(w).quantize_int8()  # passes
    swap = torch.arange(128).view(-1, 2).flip(-1).reshape(-1)
    if fmt == "int4":
        real = int4_format.int4_pack
        monkeypatch.setattr(int4_format, "int4_pack",
                            lambda codes: real(codes[:, swap].contiguous()))
    else:
        real8 = Linear._int8_mm
        monkeypatch.setattr(Linear, "_int8_mm", lambda self, x: real8(self, x[:, swap]))
    lin = _linear(w)
    with pytest.raises(ValueError, match=f"{fmt} weights on cpu: .*differ from the quantized"):
        lin.quantize_int4() if fmt == "int4" else lin.quantize_int8()


def test_a_kernel_that_fails_is_a_clear_error(monkeypatch):
    def broken(self, x):
        raise NotImplementedError("Could not run 'aten::_weight_int8pack_mm' with arguments "
                                  "from the 'CUDA' backend.\nmore")

    monkeypatch.setattr(Linear, "_int8_mm", broken)
    with pytest.raises(ValueError, match=r"int8 weights on cpu: PyTorch's kernel failed "
                                         r"\(Could not run .*backend\.\); serve --weights dense"):
        _linear(torch.randn(16, 64)).quantize_int8()


def test_nibbles_pack_element_2j_high_as_the_cuda_packer_reads_them():
    from mtpserve.decoding.model.int4_format import pack_nibbles

    codes = torch.tensor([[1, 2, 3, 4], [15, 0, 7, 8]], dtype=torch.int32)
    packed = pack_nibbles(codes)
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [[0x12, 0x34], [0xF0, 0x78]]
    codes = torch.randint(0, 16, (24, 96), dtype=torch.int32)
    p = pack_nibbles(codes).to(torch.int32)
    assert torch.equal(torch.stack([p >> 4, p & 15], -1).reshape(24, 96), codes)


def test_probe_columns_cover_both_nibbles_and_the_whole_row():
    from mtpserve.decoding.model.int4_format import probe_columns

    for k in (32, 576, 1536):
        cols = probe_columns(k)
        assert cols.tolist() == sorted(set(cols.tolist()))
        assert {0, 1, 2, 3, k - 1} <= set(cols.tolist())
        assert (cols % 2 == 1).any() and (cols >= k // 2).any()


@pytest.mark.parametrize("k, tiles", [(576, 4), (1536, 8), (96, 2)])
def test_int4_packing_for_cuda_has_the_shapes_the_cuda_kernel_checks(k, tiles, monkeypatch):
    """No GPU here: PyTorch's fake tensors run the CUDA ops' shape rules. The packed
    weight and [K/32, N, 2] scales_zeros give an [M, N] product; tinygemm reads k-tiles
    in the widest of 8, 4, 2 that divides K. (Fake CUDA tensors cannot run elementwise
    ops in a CPU build, so the nibbles, tested above, arrive as an empty [N, K/2] uint8.)"""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from mtpserve.decoding.model import int4_format
    from mtpserve.decoding.model.int4_format import int4_mm, int4_pack

    def nibbles(codes):
        assert codes.shape == (1536, k)
        return torch.empty(1536, k // 2, dtype=torch.uint8, device=codes.device)

    monkeypatch.setattr(int4_format, "pack_nibbles", nibbles)
    with FakeTensorMode():
        codes = torch.empty(1536, k, dtype=torch.int32, device="cuda")
        packed = int4_pack(codes)
        assert tuple(packed.shape) == (1536 // 8, k // (16 * tiles), 32, tiles // 2)
        sz = torch.empty(k // INT4_GROUP, 1536, 2, dtype=torch.bfloat16, device="cuda")
        x = torch.empty(3, k, dtype=torch.bfloat16, device="cuda")
        y = int4_mm(x, packed, INT4_GROUP, sz)
        assert tuple(y.shape) == (3, 1536) and y.device.type == "cuda"


def test_int4_for_cuda_needs_out_features_in_whole_tiles_of_8():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from mtpserve.decoding.model.int4_format import int4_pack

    with FakeTensorMode(), pytest.raises(ValueError, match="divisible by 8, got 12"):
        int4_pack(torch.empty(12, 64, dtype=torch.int32, device="cuda"))


def test_quantized_weights_on_other_devices_are_refused_clearly():
    lin = Linear(64, 16, bias=False).to("meta")
    with pytest.raises(ValueError, match="int4 weights use PyTorch's CPU or CUDA kernels, not meta"):
        lin.quantize_int4()


def test_kv_cache_dtype_auto_is_fp16_for_quantized_weights_with_the_row_kernel():
    """--kv-cache-dtype auto on CPU: fp16 (half the bytes attention reads, the same fp32
    arithmetic) only where the weights are quantized and the row kernel reads the cache;
    dense weights keep fp32 (the reference precision); an explicit choice is kept."""
    from mtpserve.decoding.model.device import kv_cache_dtype

    cpu = torch.device("cpu")
    assert kv_cache_dtype(torch.float32, cpu, quantized=True, row_kernel=True) == torch.float16
    assert kv_cache_dtype(torch.float32, cpu, quantized=True, row_kernel=False) == torch.float32
    assert kv_cache_dtype(torch.float32, cpu, quantized=False, row_kernel=True) == torch.float32
    assert kv_cache_dtype(torch.float32, cpu, "float32", quantized=True,
                          row_kernel=True) == torch.float32
    assert kv_cache_dtype(torch.float32, cpu, "float16") == torch.float16
    assert kv_cache_dtype(torch.bfloat16, torch.device("cuda"), quantized=True,
                          row_kernel=True) == torch.bfloat16
    with pytest.raises(ValueError, match="kv_cache_dtype must be auto"):
        EngineConfig(kv_cache_dtype="bfloat16")


def test_an_fp16_kv_cache_decodes_as_the_fp32_one_on_a_tiny_int4_model(default_engine):
    """The same int4 model with its cache in fp16 (the auto choice where the row kernel
    runs) and in fp32: prefill (SDPA over the upcast cache) and decode rows (the row kernel
    widening fp16) give the same greedy tokens, and the fp16 cache holds fp32's values
    rounded."""
    from mtpserve.decoding.model import row_attention

    tok = default_engine.tokenizer
    ids = tok.encode("The capital of France is")
    outs, caches = [], []
    for dtype in ("float16", "float32"):
        eng = tiny_int4_engine(tok, kv_cache_dtype=dtype)
        assert eng.kv.buf.dtype == getattr(torch, dtype)
        outs.append(eng.generate([ids], _greedy(12))[0]["token_ids"])
        caches.append(eng.kv.buf[:, :, 0, :, :len(ids)].clone())
    assert outs[0] == outs[1] and len(outs[0]) == 12
    torch.testing.assert_close(caches[0].float(), caches[1], rtol=1e-3, atol=1e-3)
    auto = tiny_int4_engine(tok).kv.buf.dtype
    assert auto == (torch.float16 if row_attention.available() else torch.float32)
