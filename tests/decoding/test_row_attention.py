"""Row attention (model/row_attention.py, kernels/row_attention.cpp).

Each query row attends over its own keys in cache order (committed prefix, then its tree
ancestors and itself) with an online softmax, one (row, KV head) at a time: close to an
fp64 reference, and a row's bits are the same alone, as a tree node, beside other
sequences (1..64 rows) and at 1 or 2 threads. End to end (the session's default model):
with the kernel and --batch-invariant on, speculative greedy == plain greedy and a
sequence's greedy tokens alone == in a batch.
"""

from __future__ import annotations


import pytest
import torch
from decoding_helpers import fresh_process
from mtpserve.decoding.model import row_attention as ra
from mtpserve.decoding.model.attention import attend, attend_cached
from mtpserve.decoding.model.attention_metadata import AttentionMetadata, padded_layout
from mtpserve.decoding.model.device import cpu_flags
from mtpserve.decoding.model.kv_cache import KVCache
from mtpserve.decoding.spec.tree import DraftTree

pytestmark = pytest.mark.skipif(not ra.available(),
                                reason="the row attention kernel does not build or load here")

HQ, HKV, D, SCALE = 9, 3, 64, 0.125


def _cache(slots: int, slot_len: int, seed: int, layers: int = 2,
           dtype: torch.dtype = torch.float32) -> KVCache:
    kv = KVCache.__new__(KVCache)
    g = torch.Generator().manual_seed(seed)
    kv.buf = torch.randn(layers, 2, slots, HKV, slot_len, D, generator=g).to(dtype)
    return kv


def _meta(items: list[tuple[int, int, list[int] | None]], kv_len: int | None = None
          ) -> AttentionMetadata:
    """items: (slot, committed length, tree parents or None for one decode row), as
    step_inputs.attention_meta lays them out (tree nodes at the indices after the prefix)."""
    own = [DraftTree(tokens=[0] * len(p), parents=p).ancestor_mask() if p is not None
           else torch.ones(1, 1, dtype=torch.bool) for _, _, p in items]
    counts = [m.shape[0] for m in own]
    B, lq = len(items), max(counts)
    kv_len = kv_len or max(start + n for (_, start, _), n in zip(items, counts))
    mask = None
    if B > 1 or lq > 1:
        mask = torch.zeros(B, 1, lq, kv_len, dtype=torch.bool)
        for b, ((_, start, _), m) in enumerate(zip(items, own)):
            n = counts[b]
            mask[b, 0, :n, :start] = True
            mask[b, 0, :n, start:start + n] = m
            mask[b, 0, n:, 0] = True
    qg, qs = padded_layout(counts)
    e = torch.empty(0, dtype=torch.long)
    slots = [s for s, _, _ in items]
    return AttentionMetadata(positions=e, token_slots=e, token_store=e,
                             seq_slots=torch.tensor(slots), slot_start=None, kv_len=kv_len,
                             num_seqs=B, q_len=lq, q_gather=qg, q_scatter=qs, mask=mask)


def _reference(q, kv, layer, meta) -> torch.Tensor:
    """fp64 softmax(q k^T * scale) v over each row's visible keys."""
    slots, prefix, offsets, extra = ra.row_layout(meta, q.shape[0])
    out = torch.empty(q.shape, dtype=torch.float64)
    for t in range(q.shape[0]):
        idx = torch.cat([torch.arange(int(prefix[t])), extra[offsets[t]:offsets[t + 1]]])
        k = kv.buf[layer, 0, slots[t]][:, idx].double()  # [Hkv, n, D]
        v = kv.buf[layer, 1, slots[t]][:, idx].double()
        qt = q[t].double().view(HKV, HQ // HKV, D)
        p = torch.softmax(qt @ k.transpose(1, 2) * SCALE, -1)
        out[t] = (p @ v).reshape(HQ, D)
    return out


TREES = {"chain4": [-1, 0, 1, 2], "wide": [-1, 0, 0, 0, 0, 1],
         "tree16": [-1, 0, 0, 0, 1, 1, 2, 3, 4, 4, 5, 6, 7, 8, 9, 10]}


@pytest.mark.parametrize("cache", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", ["decode", "chain4", "wide", "tree16", "mixed"])
def test_close_to_an_fp64_reference(shape, cache):
    """Against fp64 over the cache's own values (an fp16 cache's are widened exactly, the
    arithmetic stays fp32: the same bound)."""
    kv = _cache(6, 700, seed=1, dtype=cache)
    if shape == "decode":
        items = [(2, 300, None)]
    elif shape == "mixed":  # several sequences, lengths and trees in one pass
        items = [(0, 5, None), (3, 640, TREES["tree16"]), (1, 31, TREES["wide"]),
                 (5, 200, None), (4, 129, TREES["chain4"])]
    else:
        items = [(1, 300, TREES[shape])]
    meta = _meta(items)
    T = sum(len(p) if p else 1 for _, _, p in items)
    q = torch.randn(T, HQ, D, generator=torch.Generator().manual_seed(2))
    out = ra.attend_rows(q, kv, 1, meta, SCALE)
    ref = _reference(q, kv, 1, meta)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=2e-6)
    assert (out.double() - ref).abs().max() < 2e-6
    # and the SDPA path on the same metadata agrees (the engine's two kernels)
    sdpa = attend_cached(q, kv, 1, _meta(items), SCALE)
    torch.testing.assert_close(out, sdpa, rtol=1e-5, atol=1e-5)


def test_a_wrong_key_breaks_the_comparison():
    """The reference check can fail: a row that misses one of its keys is far off."""
    kv = _cache(2, 100, seed=3)
    meta = _meta([(0, 40, TREES["chain4"])])
    q = torch.randn(4, HQ, D, generator=torch.Generator().manual_seed(4)) * 4
    meta.row_layout = ra.row_layout(meta, 4)
    slots, prefix, offsets, extra = meta.row_layout
    meta.row_layout = (slots, prefix - 1, offsets, extra)  # every row loses its last prefix key
    out = ra.attend_rows(q, kv, 0, meta, SCALE)
    assert (out.double() - _reference(q, kv, 0, _meta([(0, 40, TREES["chain4"])]))).abs().max() > 1e-4


def _alone(q_row, kv, layer, slot, keys) -> torch.Tensor:
    """The row as one decode row of a fresh cache holding exactly its keys, contiguous."""
    n = len(keys)
    solo = KVCache.__new__(KVCache)
    solo.buf = torch.zeros(1, 2, 1, HKV, n + 7, D, dtype=kv.buf.dtype)
    solo.buf[0, :, 0, :, :n] = kv.buf[layer, :, slot][:, :, keys]
    solo.buf[0, :, 0, :, n:] = 1e4  # garbage after its keys: must not be read
    return ra.attend_rows(q_row[None], solo, 0, _meta([(0, n - 1, None)]), SCALE)[0]


@pytest.mark.parametrize("threads,cache", [(1, torch.float32), (2, torch.float32),
                                           (2, torch.float16)])
def test_a_row_has_the_same_bits_alone_in_a_tree_and_in_a_batch(threads, cache):
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(7)
        kv = _cache(66, 600, seed=8, dtype=cache)
        start, parents, node = 250, TREES["tree16"], 13
        tree = DraftTree(tokens=[0] * 16, parents=parents)
        anc = torch.nonzero(tree.ancestor_mask()[node]).flatten().tolist()
        keys = list(range(start)) + [start + a for a in anc]
        q = torch.randn(64 + 16, HQ, D, generator=g)
        target = q[0]
        ref = _alone(target, kv, 0, 10, keys)
        # in its tree (siblings and cousins between its ancestors in the cache)
        qt = q[:16].clone()
        qt[node] = target
        out = ra.attend_rows(qt, kv, 0, _meta([(10, start, parents)]), SCALE)
        assert torch.equal(out[node], ref)
        # the tree inside batches of M rows of other sequences (decode rows and trees)
        lens = torch.randint(1, 580, (64,), generator=g).tolist()
        for M in (1, 2, 3, 8, 17, 64):
            others = [(s if s < 10 else s + 1, lens[s], None if s % 3 else TREES["chain4"])
                      for s in range(M)]
            items = others[:M // 2] + [(10, start, parents)] + others[M // 2:]
            rows_before = sum(len(p) if p else 1 for _, _, p in items[:M // 2])
            T = rows_before + 16 + sum(len(p) if p else 1 for _, _, p in items[M // 2 + 1:])
            qb = torch.randn(T, HQ, D, generator=g)
            qb[rows_before + node] = target
            out = ra.attend_rows(qb, kv, 0, _meta(items), SCALE)
            assert torch.equal(out[rows_before + node], ref), M
        # the same row as a plain decode row of a 64-sequence pass (the one after its prefix)
        items = [(s, lens[s], None) for s in range(64) if s != 10]
        items.insert(5, (10, start + len(anc) - 1, None))
        solo_keys = list(range(start + len(anc)))
        kv2 = _cache(66, 600, seed=8, dtype=cache)
        kv2.buf[0, :, 10, :, :start + len(anc)] = kv.buf[0, :, 10][:, :, keys]
        qb = torch.randn(64, HQ, D, generator=g)
        qb[5] = target
        out = ra.attend_rows(qb, kv2, 0, _meta(items), SCALE)
        assert torch.equal(out[5], _alone(target, kv2, 0, 10, solo_keys))
        assert torch.equal(out[5], ref)
    finally:
        torch.set_num_threads(saved)


def test_the_bits_do_not_depend_on_the_thread_count():
    kv = _cache(64, 600, seed=9)
    g = torch.Generator().manual_seed(10)
    lens = torch.randint(100, 590, (64,), generator=g).tolist()
    meta = _meta([(s, lens[s], None) for s in range(64)])
    q = torch.randn(64, HQ, D, generator=g)
    saved = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            meta.row_layout = None
            outs.append(ra.attend_rows(q, kv, 1, meta, SCALE))
    finally:
        torch.set_num_threads(saved)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("env, path", [
    ("MTPSERVE_ROWS_GENERIC", "generic"),
    pytest.param("MTPSERVE_ROWS_AVX2", "avx2", marks=pytest.mark.skipif(
        not {"avx2", "fma", "f16c"} <= cpu_flags(), reason="the AVX2 path needs AVX2+FMA+F16C"))])
def test_the_slower_paths_are_close_to_the_reference_and_batch_invariant(env, path):
    """The paths of CPUs without AVX-512 (the generic C++ one, and AVX2+FMA+F16C), forced
    here in a fresh process as the path is chosen once per process: the fp64 reference at
    every shape and cache dtype, a row's bits the same alone, in its tree and in batches,
    and at 1 or 2 threads."""
    code = ("import torch, sys; sys.path.insert(0, 'tests/decoding');"
            "import test_row_attention as t; from mtpserve.decoding.model import row_attention as ra;"
            f"assert ra.kernel_path() == {path!r}, ra.kernel_path();"
            "[t.test_close_to_an_fp64_reference(s, c) for s in t.TREES.keys() | {'decode', 'mixed'}"
            " for c in (torch.float32, torch.float16)];"
            "[t.test_a_row_has_the_same_bits_alone_in_a_tree_and_in_a_batch(n, c)"
            " for n, c in ((1, torch.float32), (2, torch.float16))];"
            "t.test_the_bits_do_not_depend_on_the_thread_count();"
            "print('ok')")
    r = fresh_process(code, **{env: "1"})
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


@pytest.mark.parametrize("kv_dtype,cache", [(torch.float32, torch.float32),
                                            (torch.bfloat16, torch.float32),
                                            (torch.float32, torch.float16)])
def test_the_fused_write_equals_write_then_attend(kv_dtype, cache):
    """write_and_attend's one-call path (a step of decode/tree rows alone) leaves the same
    cache bytes and returns the same bits as KVCache.write followed by attend_rows, with k/v
    in the cache's dtype or another (the kernel casts; into fp16 as Tensor.to rounds)."""
    from mtpserve.decoding.model.attention import write_and_attend
    g = torch.Generator().manual_seed(12)
    items = [(3, 40, TREES["wide"]), (0, 17, None), (5, 90, TREES["chain4"])]
    meta = _meta(items)
    T = 6 + 1 + 4
    meta.token_slots = torch.tensor([3] * 6 + [0] + [5] * 4)
    meta.token_store = torch.tensor(list(range(40, 46)) + [17] + list(range(90, 94)))
    q = torch.randn(T, HQ, D, generator=g)
    k, v = (torch.randn(T, HKV, D, generator=g).to(kv_dtype) for _ in range(2))
    fused, split = (_cache(6, 120, seed=13, dtype=cache) for _ in range(2))
    out = write_and_attend(q, k, v, fused, 1, meta, SCALE, rows=True)
    meta.row_layout = None
    split.write(1, meta, k, v)
    ref = ra.attend_rows(q, split, 1, meta, SCALE)
    assert torch.equal(fused.buf, split.buf)
    assert torch.equal(out, ref)
    assert not torch.equal(out, ra.attend_rows(q, _cache(6, 120, seed=13, dtype=cache), 1, meta,
                                               SCALE))


@pytest.mark.parametrize("act", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cache", [torch.float32, torch.float16])
def test_the_compiled_step_op_equals_the_fused_write(act, cache):
    """step_attention's C++ path (a compiled decode/tree step, its layout installed once by
    set_step_rows) converts q, k, v and the output itself: strided inputs in the step's
    dtype, padding rows past the real ones. It leaves the cache bytes and returns the bits
    of write_row_attention on the real rows, cast as Tensor.to casts, padding rows zero."""
    g = torch.Generator().manual_seed(21)
    items = [(3, 40, TREES["wide"]), (0, 17, None), (5, 90, TREES["chain4"])]
    meta = _meta(items)
    n, padded = 11, 16
    slots = torch.tensor([3] * 6 + [0] + [5] * 4)
    store = torch.tensor(list(range(40, 46)) + [17] + list(range(90, 94)))
    layout = ra.row_layout(meta, n)
    # q, k, v as a fused projection's column slices: rows strided, heads contiguous
    qkv = torch.randn(padded, (HQ + 2 * HKV) * D, generator=g).to(act)
    q = qkv[:, :HQ * D].view(padded, HQ, D)
    k = qkv[:, HQ * D:(HQ + HKV) * D].view(padded, HKV, D)
    v = qkv[:, (HQ + HKV) * D:].view(padded, HKV, D)
    step, ref = (_cache(6, 120, seed=22, layers=3, dtype=cache) for _ in range(2))
    ops = torch.ops.mtpserve_rows
    ops.set_step_rows(step.buf, slots, store, *layout, n)
    try:
        out = ops.step_attention(q, k, v, 2, SCALE)
    finally:
        ops.clear_step_rows()
    want = ops.write_row_attention(q[:n].float(), k[:n], v[:n], ref.buf[2], slots, store,
                                   *layout, SCALE).to(act)
    assert out.dtype == act and out.shape == (padded, HQ, D)
    assert torch.equal(out[:n], want) and not out[n:].any()
    assert torch.equal(step.buf, ref.buf)


def test_the_step_layout_is_checked_once_when_installed():
    kv = _cache(2, 120, seed=23, layers=2)
    layout = ra.row_layout(_meta([(0, 10, None)]), 1)
    with pytest.raises(RuntimeError, match="stores outside the cache"):
        torch.ops.mtpserve_rows.set_step_rows(kv.buf, torch.tensor([0]), torch.tensor([120]),
                                              *layout, 1)
    bad = (layout[0], torch.tensor([121]), layout[2], layout[3])  # a prefix past the cache
    with pytest.raises(RuntimeError, match="outside the cache"):
        torch.ops.mtpserve_rows.set_step_rows(kv.buf, torch.tensor([0]), torch.tensor([10]),
                                              *bad, 1)


def test_the_fused_write_refuses_a_store_outside_the_cache():
    meta = _meta([(0, 10, None)])
    meta.token_slots, meta.token_store = torch.tensor([0]), torch.tensor([120])
    kv = _cache(2, 120, seed=14)
    with pytest.raises(RuntimeError, match="stores outside the cache"):
        ra.write_attend_rows(torch.randn(1, HQ, D), torch.randn(1, HKV, D),
                             torch.randn(1, HKV, D), kv, 0, meta, SCALE)


def test_sdpa_stays_for_a_prefill_chunk():
    kv = _cache(2, 100, seed=11)
    meta = _meta([(0, 10, None)])
    meta.chunk = True
    q = torch.randn(1, HQ, D)
    out = attend_cached(q, kv, 0, meta, SCALE, rows=True)
    assert meta.row_layout is None
    assert torch.equal(out, attend(q, kv.keys(0, meta), kv.values(0, meta), meta, SCALE))



# End to end: tests/decoding/test_batch_invariance.py's engine (the default int4 weights,
# --batch-invariant on) attends with this kernel where it loads (--attention-kernel auto;
# test_the_invariant_engine_attends_with_the_row_kernel there): speculative greedy == plain
# greedy over 128 tokens, alone == in a batch. The session's dense fp32 engine cannot carry
# that test: its dense GEMM is not row-invariant (set_batch_invariant reports it).
