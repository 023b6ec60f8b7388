"""The trunk's compiled graph saved to disk (model/saved_graph.py): a later start reads it
instead of tracing the trunk again, and serves exactly what a compiling start serves;
another model layout, setting or machine is another file; a broken file is compiled
again, never an error; a frozen (dense) graph, which holds its weights, is never saved.
Tiny int4 models (compiled in seconds); tests/decoding/test_batch_invariance.py serves
the default model through the same path (saved by its first run, read by later ones)."""

from __future__ import annotations

import pytest
import torch
from decoding_helpers import (
    REPEATING,
    greedy,
    randomize_,
    run_requests,
    tiny_engine,
    tiny_int4_engine,
)
from mtpserve.decoding.model import saved_graph

PROMPT = "one two three"


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setattr(saved_graph, "graph_folder", lambda: tmp_path)
    return tmp_path


def _serve(eng) -> list[list[int]]:
    tok = eng.tokenizer
    reqs = [(tok.encode(REPEATING), greedy(12, ignore_eos=True)),  # n-gram drafts: tree rows
            (tok.encode(PROMPT), greedy(12, ignore_eos=True, speculate=False))]
    return [r.token_ids for r in run_requests(eng, reqs)]


@torch.inference_mode()
def _hidden(eng, rows: int) -> torch.Tensor:
    slot = eng.kv.allocate()
    try:
        ids, meta = eng.compiled._warm_inputs(eng.kv, slot, rows)
        return eng.compiled(ids + 5, meta, eng.kv)
    finally:
        eng.kv.free(slot)


def test_a_second_start_reads_the_graph_and_serves_the_same_bits(default_engine, folder):
    first = tiny_int4_engine(default_engine.tokenizer, compile="on")
    ct = first.compiled
    assert ct is not None and ct.save and (ct.compiles, ct.loaded) == (1, 0)
    assert len(list(folder.glob("trunk-*.aot"))) == 1
    second = tiny_int4_engine(default_engine.tokenizer, compile="on")
    ct2 = second.compiled
    assert (ct2.compiles, ct2.loaded) == (0, 1), "the saved graph was not read"
    for rows in (1, 3, 9):  # the one graph: every row count, the padded one-row pass too
        assert torch.equal(_hidden(second, rows), _hidden(first, rows))
    steps, direct = ct2.steps, ct2.direct_steps
    assert _serve(second) == _serve(first)
    assert ct2.compiles == 0, "a graph was compiled while serving"
    assert ct2.direct_steps - direct == ct2.steps - steps > 0  # all through the saved code
    eager = tiny_int4_engine(default_engine.tokenizer, compile="off")
    assert _serve(second) == _serve(eager)


def test_an_unreadable_file_is_compiled_again_and_replaced(default_engine, folder, caplog):
    tiny_int4_engine(default_engine.tokenizer, compile="on")
    (path,) = folder.glob("trunk-*.aot")
    path.write_bytes(b"not a compiled graph")
    with caplog.at_level("WARNING"):
        eng = tiny_int4_engine(default_engine.tokenizer, compile="on")
    assert any("unreadable" in r.getMessage() for r in caplog.records)
    assert (eng.compiled.compiles, eng.compiled.loaded) == (1, 0)
    assert path.stat().st_size > 1000  # saved anew
    again = tiny_int4_engine(default_engine.tokenizer, compile="on")
    assert (again.compiled.compiles, again.compiled.loaded) == (0, 1)


def test_the_key_changes_with_what_the_graph_was_specialized_on(default_engine):
    model = tiny_int4_engine(default_engine.tokenizer).model
    same = tiny_int4_engine(default_engine.tokenizer, seed=9).model  # other values, same layout
    opts = {"freezing": False}
    key = saved_graph.graph_key(model, opts, {"return_pre_last": False})
    assert saved_graph.graph_key(same, opts, {"return_pre_last": False}) == key
    assert saved_graph.graph_key(model, opts, {"return_pre_last": True}) != key
    assert saved_graph.graph_key(model, {"freezing": False, "max_autotune": True},
                                 {"return_pre_last": False}) != key
    attn = model.layers[0].self_attn
    attn.row_kernel = not attn.row_kernel  # a flag the traced code branches on
    assert saved_graph.graph_key(model, opts, {"return_pre_last": False}) != key
    attn.row_kernel = not attn.row_kernel
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)  # inductor's GEMM templates block for the count
    try:
        assert saved_graph.graph_key(model, opts, {"return_pre_last": False}) != key
    finally:
        torch.set_num_threads(threads)
    assert saved_graph.graph_key(model, opts, {"return_pre_last": False}) == key


def test_a_frozen_dense_graph_is_never_saved(default_engine, folder):
    eng = tiny_engine(default_engine.tokenizer, max_num_seqs=2, compile="on")
    assert eng.compiled is not None and not eng.compiled.save
    assert eng.compiled.compiles == 1 and not list(folder.iterdir())


@torch.inference_mode()
def test_the_draft_chain_saves_each_depth_and_reads_it_back(default_engine, folder,
                                                            caplog):
    """Over an int4 trunk the draft chain's depth graphs are saved too: a second chain
    reads them and drafts exactly what the compiling one drafts."""
    from mtpserve.decoding.spec.compiled_draft import CompiledDraftChain
    from mtpserve.decoding.spec.mtp_sequential import SequentialMTPHeads

    model = tiny_int4_engine(default_engine.tokenizer).model
    heads = SequentialMTPHeads.new(model.config, num_modules=2, default_tree="chain2",
                                   context=False)
    heads = randomize_(heads, 3).eval()
    # a draft vocabulary and int4 projections over the int4 trunk, as the shipped heads
    # draft (a dense unembedding is a oneDNN linear that only a frozen graph lowers)
    heads.set_draft_vocab(torch.arange(0, model.config.vocab_size, 7))
    heads.prepare(model)
    first = CompiledDraftChain(heads, model)
    first.warm_up([1, 2], torch.float32)
    assert first.save and (first.compiles, first.loaded) == (2, 0)
    assert len(list(folder.glob("draft*.aot"))) == 2
    second = CompiledDraftChain(heads, model)
    second.warm_up([1, 2], torch.float32)
    assert (second.compiles, second.loaded) == (0, 2)
    g = torch.Generator().manual_seed(0)
    for depth in (1, 2):
        for b in (1, 4):
            hidden = torch.randn(b, model.config.hidden_size, generator=g)
            tokens = torch.randint(0, model.config.vocab_size, (b,), generator=g)
            pos0 = torch.randint(0, 100, (b,), generator=g)
            got = second(hidden, tokens, pos0, depth)
            assert torch.equal(got, first(hidden, tokens, pos0, depth))
            assert torch.equal(got, heads.chain_tops(hidden, tokens, pos0, depth, model))
    assert second.compiles == 0 and second.direct_calls == first.direct_calls == 4 + 4
    # --tree auto: a deeper depth compiled once the heads hold the chain (extend) saves too
    heads.compiled_chain = first
    try:
        with caplog.at_level("WARNING"):
            first.extend(3)
    finally:
        heads.compiled_chain = None
    assert "ahead of time failed" not in caplog.text
    assert first.compiles == 3 and len(list(folder.glob("draft3-*.aot"))) == 1


def test_a_read_graph_that_fails_to_run_is_removed_and_served_eagerly(default_engine, folder,
                                                                      monkeypatch, caplog):
    """A file that reads back but whose graph fails its warm-up pass: that start serves
    eagerly (the warning of any failed compile), the file is deleted, the next start
    compiles and saves it again."""
    tiny_int4_engine(default_engine.tokenizer, compile="on")
    (path,) = folder.glob("trunk-*.aot")

    def broken(*args):
        raise RuntimeError("saved graph does not run")

    real_load = saved_graph.load
    monkeypatch.setattr(saved_graph, "load", lambda key, name: broken)
    with caplog.at_level("WARNING"):
        eng = tiny_int4_engine(default_engine.tokenizer, compile="on")
    assert eng.compiled is None and not path.exists()
    assert any("compiling the trunk failed (RuntimeError: saved graph does not run)"
               in r.getMessage() for r in caplog.records)
    monkeypatch.setattr(saved_graph, "load", real_load)  # (undo would drop `folder` too)
    again = tiny_int4_engine(default_engine.tokenizer, compile="on")
    assert (again.compiled.compiles, again.compiled.loaded) == (1, 0) and path.exists()
