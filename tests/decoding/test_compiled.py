"""The compiled trunk (--compile on, model/compiled.py): the same hidden states and K/V as
the eager forward, a padding row that writes nothing, greedy tokens unchanged (plain ==
speculative == eager), one graph whose rows do not depend on the row count, and no
recompilation while serving. ONE tiny random-weight model (float64): its compile is
seconds, the real model's under a minute (benchmarks/compiled_step.py measures that one;
tests/decoding/test_batch_invariance.py runs it compiled end to end)."""

from __future__ import annotations

import logging
import pytest
import torch

from decoding_helpers import greedy, run_requests, tiny_engine
from mtpserve.decoding.model.attention_metadata import AttentionMetadata, padded_layout
from mtpserve.decoding.model.compiled import CompiledTrunk, compile_wanted

PROMPTS = [[11, 12, 13, 14, 15], [5, 6, 7, 5, 6, 7, 5, 6], [300, 301, 302],
           list(range(40, 60))]  # the last: a 20-token prefill, compiled like every step


@pytest.fixture(scope="module")
def engines(default_engine):
    eager = tiny_engine(default_engine.tokenizer, max_num_seqs=4)
    compiled = tiny_engine(default_engine.tokenizer, max_num_seqs=4, compile="on")
    return eager, compiled


def test_warm_up_compiles_one_graph_for_every_row_count(engines):
    _, eng = engines
    assert eng.compiled is not None and eng.compiled.eager_from is None
    assert eng.compiled.compiles == 1


@torch.inference_mode()
def test_step_matches_eager_and_padding_writes_no_kv(engines):
    """Two sequences with 3- and 2-node trees (5 rows, padded query layout): hidden rows
    and written K/V equal the eager forward's; nothing else in the cache moves. Then one
    decode row, padded to the graph's two: the padding row writes nothing."""
    _, eng = engines
    model, kv, ct = eng.model, eng.kv, eng.compiled
    slots = [kv.allocate(), kv.allocate()]
    try:
        prefix = [6, 4]
        for slot, n in zip(slots, prefix):  # a committed prefix per slot, eagerly
            kv.ensure_initialized(slot, 16)
            ar = torch.arange(n)
            meta = AttentionMetadata(
                positions=ar, token_slots=torch.full((n,), slot), token_store=ar,
                seq_slots=torch.tensor([slot]), slot_start=slot, kv_len=n, num_seqs=1,
                q_len=n, q_gather=None, q_scatter=None,
                mask=torch.ones(n, n, dtype=torch.bool).tril_()[None, None])
            model(torch.arange(n) + 7 * slot + 3, meta, kv)
        counts = [3, 2]
        own = [torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool),  # a tree
               torch.ones(2, 2, dtype=torch.bool).tril_()]
        kv_len, q_len = max(p + c for p, c in zip(prefix, counts)), max(counts)
        mask = torch.zeros(2, 1, q_len, kv_len, dtype=torch.bool)
        positions, store, tslots = [], [], []
        for b, (slot, p, c) in enumerate(zip(slots, prefix, counts)):
            mask[b, 0, :c, :p] = True
            mask[b, 0, :c, p:p + c] = own[b]
            mask[b, 0, c:, 0] = True
            depths = own[b].sum(1) - 1
            positions += (p + depths).tolist()
            store += range(p, p + c)
            tslots += [slot] * c
        gather, scatter = padded_layout(counts)
        meta = AttentionMetadata(
            positions=torch.tensor(positions), token_slots=torch.tensor(tslots),
            token_store=torch.tensor(store), seq_slots=torch.tensor(slots), slot_start=None,
            kv_len=kv_len, num_seqs=2, q_len=q_len, q_gather=gather, q_scatter=scatter,
            mask=mask)
        ids = torch.tensor([21, 22, 23, 31, 32])
        before = kv.buf.clone()
        want = model(ids, meta, kv)
        kv_eager = kv.buf.clone()
        kv.buf.copy_(before)
        got = ct(ids, meta, kv)
        assert got.shape == want.shape
        # float64 model, but the norms compute in fp32 (RMSNorm), where inductor's fused
        # reductions round differently: ~1e-7 per layer; a wrong row, position or mask is O(1)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        written = torch.zeros(kv.buf.shape[2], kv.buf.shape[4], dtype=torch.bool)
        written[meta.token_slots, meta.token_store] = True
        written = written[None, None, :, None, :, None].expand_as(kv.buf)
        torch.testing.assert_close(kv.buf[written], kv_eager[written], rtol=1e-4, atol=1e-5)
        assert not torch.equal(kv_eager[written], before[written])  # the real rows wrote
        # nothing else moved, bit for bit (the cache's unwritten memory may hold NaN patterns)
        assert torch.equal(kv.buf[~written].view(torch.uint8), before[~written].view(torch.uint8))
        p = prefix[0] + counts[0]
        one = AttentionMetadata(
            positions=torch.tensor([p]), token_slots=torch.tensor([slots[0]]),
            token_store=torch.tensor([p]), seq_slots=torch.tensor([slots[0]]),
            slot_start=slots[0], kv_len=p + 1, num_seqs=1, q_len=1, q_gather=None,
            q_scatter=None, mask=None)
        before = kv.buf.clone()
        got = ct(torch.tensor([24]), one, kv)
        assert got.shape[0] == 1
        # bytes, not floats: NaN patterns in unwritten memory would count as moved
        moved = (kv.buf.view(torch.uint8) != before.view(torch.uint8)).nonzero()
        assert moved.numel() and set(moved[:, 2].tolist()) == {slots[0]}
        assert set(moved[:, 4].tolist()) == {p}  # the real row's position only
    finally:
        for s in slots:
            kv.free(s)


def test_greedy_compiled_equals_eager_plain_and_speculative(engines):
    """Greedy tokens: compiled plain == compiled speculative == eager, over a batch whose
    steps vary in rows (decode, trees, short and long prefills); and no graph is compiled
    while serving."""
    eager, eng = engines
    ct = eng.compiled
    compiles, served, direct = ct.compiles, ct.steps, ct.direct_steps
    reqs = lambda spec: [(p, greedy(12, ignore_eos=True, speculate=spec)) for p in PROMPTS]  # noqa: E731
    want = [r.token_ids for r in run_requests(eager, reqs(False))]
    plain = [r.token_ids for r in run_requests(eng, reqs(False))]
    spec = [r.token_ids for r in run_requests(eng, reqs(True))]
    assert plain == want
    assert spec == want
    one = lambda spec: [(PROMPTS[1], greedy(12, ignore_eos=True, speculate=spec))]  # noqa: E731
    want_one = run_requests(eager, one(False))[0].token_ids
    assert run_requests(eng, one(False))[0].token_ids == want_one  # batch-1 decode: padded
    assert run_requests(eng, one(True))[0].token_ids == want_one
    assert ct.compiles == compiles, "a graph was compiled while serving"
    assert ct.steps > served + 20  # every step of these runs went through the graph
    assert ct.direct_steps - direct == ct.steps - served  # and none through dynamo


@torch.inference_mode()
def test_a_row_gets_the_same_bits_whatever_the_row_count(engines):
    """One graph for every count: the first row of a chain of r rows over the same prefix is
    BITWISE the same for r = 1 (padded) .. 40 (what lets --batch-invariant hold compiled)."""
    _, eng = engines
    kv, ct = eng.kv, eng.compiled
    slot = kv.allocate()
    try:
        kv.ensure_initialized(slot, 64)
        n = 7

        def chain(start: int, r: int) -> AttentionMetadata:
            ar = torch.arange(start, start + r)
            mask = torch.zeros(1, 1, r, start + r, dtype=torch.bool)
            mask[0, 0, :, :start] = True
            mask[0, 0, :, start:] = torch.ones(r, r, dtype=torch.bool).tril_()
            return AttentionMetadata(
                positions=ar, token_slots=torch.full((r,), slot), token_store=ar,
                seq_slots=torch.tensor([slot]), slot_start=slot, kv_len=start + r, num_seqs=1,
                q_len=r, q_gather=None, q_scatter=None, mask=mask)

        ct(torch.arange(n) + 9, chain(0, n), kv)
        ids = torch.arange(100, 140)
        first = ct(ids[:1], chain(n, 1), kv)[0].clone()
        for r in (2, 3, 5, 8, 9, 16, 40):
            assert torch.equal(ct(ids[:r], chain(n, r), kv)[0], first), f"{r} rows"
    finally:
        kv.free(slot)


def test_decode_steps_attend_in_cpp_and_match_the_eager_row_kernel(default_engine):
    """With the row kernel (fp32 here), a compiled layer calls mtpserve_rows::step_attention:
    decode and tree steps run its C++ path, one call per layer and no Python, prefill
    steps hand it to cached_attention; greedy tokens equal the eager row kernel's, plain
    and speculative, batch 1 (padded rows) and 4."""
    from mtpserve.decoding.model import row_attention

    if not row_attention.available():
        pytest.skip("the row attention kernel does not build here")
    tok = default_engine.tokenizer
    eager = tiny_engine(tok, dtype=torch.float32, max_num_seqs=4, attention_kernel="rows")
    eng = tiny_engine(tok, dtype=torch.float32, max_num_seqs=4, attention_kernel="rows",
                      compile="on")
    assert eng.model.attention_kernel == "rows" and eng.compiled is not None
    calls = torch.ops.mtpserve_rows.step_rows_calls
    layers = eng.model.config.num_layers
    for batch in (PROMPTS[1:2], PROMPTS):
        for spec in (False, True):
            reqs = [(p, greedy(12, ignore_eos=True, speculate=spec)) for p in batch]
            want = [r.token_ids for r in run_requests(eager, reqs)]
            before, steps = calls(), eng.compiled.steps
            assert [r.token_ids for r in run_requests(eng, reqs)] == want, (len(batch), spec)
            taken = calls() - before
            # the prefill steps go through Python, every later step through C++
            assert taken % layers == 0 and 0 < taken // layers < eng.compiled.steps - steps


@pytest.mark.parametrize("mode,device,weights,want", [
    ("auto", "cpu", "int4", True), ("auto", "cpu", "int8", True),
    ("auto", "cpu", "dense", False), ("auto", "cuda", "int4", False),
    ("on", "cuda", "dense", True), ("off", "cpu", "int4", False)])
def test_compile_auto_is_on_only_where_it_measured_faster(mode, device, weights, want):
    assert compile_wanted(mode, device, weights) is want


def test_compile_auto_without_a_compiler_serves_eagerly_and_says_why(tmp_path, monkeypatch,
                                                                     caplog):
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++ (inductor's compiler) here
    monkeypatch.delenv("CXX", raising=False)
    with caplog.at_level(logging.WARNING):
        assert compile_wanted("auto", "cpu", "int4") is False
    assert "no C++ compiler (g++)" in caplog.text and "apt-get install g++" in caplog.text
    assert compile_wanted("on", "cpu", "int4") is True  # asked for: tried (and falls back)


def test_auto_on_a_dense_model_serves_eagerly(default_engine):
    eng = tiny_engine(default_engine.tokenizer, max_num_seqs=2, compile="auto")
    assert eng.compiled is None


def test_a_failed_compile_serves_eagerly_with_a_warning(default_engine, monkeypatch, caplog):
    """Inductor can fail at startup (no compiler, an unsupported op): the engine logs a
    warning and serves the same tokens eagerly, never a crash."""
    def broken(self, *args, **kwargs):
        raise RuntimeError("C++ compile failed: no compiler\ndetails")

    monkeypatch.setattr(CompiledTrunk, "warm_up", broken)
    with caplog.at_level("WARNING"):
        eng = tiny_engine(default_engine.tokenizer, max_num_seqs=2, compile="on")
    assert eng.compiled is None
    assert any("compiling the trunk failed (RuntimeError: C++ compile failed: no compiler)"
               in r.getMessage() for r in caplog.records)
    eager = tiny_engine(default_engine.tokenizer, max_num_seqs=2)
    req = [(PROMPTS[0], greedy(8, ignore_eos=True, speculate=False))]
    assert run_requests(eng, req)[0].token_ids == run_requests(eager, req)[0].token_ids
    assert eng.kv.allocate() is not None  # the warm-up slot went back to the pool


def test_an_input_the_warm_up_did_not_cover_recompiles_instead_of_failing(default_engine):
    """After warm-up neither dynamo nor its guards run; a tensor made outside inference
    mode (another dispatch key set) fails the engine's own check and makes dynamo refuse
    its shortcut: the call goes on with full guards and gives the eager result, it does
    not fail the step."""
    eng = tiny_engine(default_engine.tokenizer, max_num_seqs=2, compile="on")
    ct, kv = eng.compiled, eng.kv
    assert ct.warm and ct.compiles == 1
    slot = kv.allocate()
    try:
        kv.ensure_initialized(slot, 4)
        pos = torch.tensor([3])
        meta = AttentionMetadata(positions=pos, token_slots=torch.tensor([slot]), token_store=pos,
                                 seq_slots=torch.tensor([slot]), slot_start=slot, kv_len=4,
                                 num_seqs=1, q_len=1, q_gather=None, q_scatter=None, mask=None)
        ids = torch.tensor([42])  # not an inference tensor, unlike the warm-up's
        with torch.no_grad():
            got = ct(ids, meta, kv)
            want = eng.model(ids, meta, kv)
    finally:
        kv.free(slot)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not ct.warm and ct.compiles == 2
    assert ct._direct is None  # two graphs for one code: dynamo chooses from now on


def test_the_cli_defaults_compile_auto_and_batch_invariance_auto():
    """`serve`/`generate`/`bench` compile where it measured faster and keep batch
    invariance where it is free; the library's EngineConfig compiles only when asked."""
    import argparse

    from mtpserve.decoding.config import EngineConfig
    from mtpserve.decoding.tools.engine_args import add_engine_args, engine_config_from_args

    p = argparse.ArgumentParser()
    add_engine_args(p)
    cfg = engine_config_from_args(p.parse_args([]))
    assert (cfg.compile, cfg.batch_invariant) == ("auto", "auto")
    assert EngineConfig().compile == "off" and EngineConfig().batch_invariant == "auto"
    assert EngineConfig(batch_invariant=True).batch_invariant == "on"
    assert EngineConfig(batch_invariant=False).batch_invariant == "off"
    with pytest.raises(ValueError, match="batch_invariant must be auto"):
        EngineConfig(batch_invariant="sometimes")
