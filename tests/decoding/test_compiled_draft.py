"""The compiled draft chain (spec/compiled_draft.py): the same drafts as eager drafting,
one graph per depth for every batch size, none compiled while serving, greedy output
unchanged, and a failed compile drafting eagerly. Tiny random-weight float64 models."""

from __future__ import annotations

import logging

import pytest
import torch

from decoding_helpers import greedy, randomize_, run_requests, tiny_config, tiny_engine
from mtpserve.decoding.spec import compiled_draft
from mtpserve.decoding.spec.compiled_draft import CompiledDraftChain, compile_draft_chain
from mtpserve.decoding.spec.mtp_sequential import SequentialMTPHeads

PROMPTS = [[11, 12, 13, 14, 15], [5, 6, 7, 5, 6, 7, 5, 6], [300, 301, 302]]


def chain_heads(cfg, context: bool = False, seed: int = 3) -> SequentialMTPHeads:
    heads = SequentialMTPHeads.new(cfg, num_modules=2, default_tree="chain2", context=context)
    return randomize_(heads, seed).to(torch.float64).eval()


@pytest.fixture(scope="module")
def engines(default_engine):
    cfg = tiny_config(vocab=default_engine.tokenizer.vocab_size, hidden=32, layers=2, heads=4,
                      kv_heads=2, tie_word_embeddings=False)
    eager = tiny_engine(default_engine.tokenizer, heads=chain_heads(cfg), proposer="heads")
    compiled = tiny_engine(default_engine.tokenizer, heads=chain_heads(cfg), proposer="heads",
                           compile="on")
    return eager, compiled


@torch.inference_mode()
def test_compiled_drafts_equal_eager_ones_at_every_depth_and_batch_size(engines):
    _, eng = engines
    chain = eng.heads.compiled_chain
    assert isinstance(chain, CompiledDraftChain)
    # one graph per depth of the served tree (chain2: --tree auto keeps it, the heads
    # carry no accuracies to time trees by)
    assert chain.depths == {1, 2} and chain.compiles == 2
    direct = chain.direct_calls
    g = torch.Generator().manual_seed(0)
    H = eng.model_config.hidden_size
    for depth in (1, 2):
        for b in (1, 3, 6):
            hidden = torch.randn(b, H, generator=g, dtype=torch.float64)
            tokens = torch.randint(0, eng.model_config.vocab_size, (b,), generator=g)
            pos0 = torch.randint(0, 100, (b,), generator=g)
            want = eng.heads.chain_tops(hidden, tokens, pos0, depth, eng.model)
            got = chain(hidden, tokens, pos0, depth)
            assert got.shape == (b, depth, eng.heads.topk)
            assert torch.equal(got, want), (depth, b)
    assert chain.compiles == 2, "a batch size or depth compiled again"
    assert chain.direct_calls - direct == 6  # every call above ran the warm graph without dynamo
    # a depth the warm-up did not compile drafts eagerly instead of compiling mid-serving
    hidden = torch.randn(2, H, dtype=torch.float64)
    tokens, pos0 = torch.tensor([1, 2]), torch.tensor([3, 4])
    assert torch.equal(chain(hidden, tokens, pos0, 5),
                       eng.heads.chain_tops(hidden, tokens, pos0, 5, eng.model))
    assert chain.compiles == 2


def test_greedy_output_is_the_same_with_the_compiled_chain(engines, monkeypatch):
    """Speculative greedy through the compiled trunk and draft chain == eager plain, and
    the drafts came from the compiled chain without compiling anything new."""
    eager, eng = engines
    chain = eng.heads.compiled_chain
    compiles, calls, direct = chain.compiles, [], chain.direct_calls
    run = CompiledDraftChain._run
    monkeypatch.setattr(CompiledDraftChain, "_run",
                        lambda self, *a: calls.append(a[-1]) or run(self, *a))
    reqs = lambda spec: [(p, greedy(12, ignore_eos=True, speculate=spec)) for p in PROMPTS]  # noqa: E731
    want = [r.token_ids for r in run_requests(eager, reqs(False))]
    got = run_requests(eng, reqs(True))
    assert [r.token_ids for r in got] == want
    assert sum(r.outputs[-1].spec.num_draft_tokens for r in got) > 0
    assert calls and set(calls) <= chain.depths
    assert chain.compiles == compiles
    assert chain.direct_calls - direct == len(calls)  # none through dynamo


def test_a_failed_draft_compile_drafts_eagerly_with_a_warning(engines, monkeypatch, caplog):
    eager, _ = engines
    heads = eager.heads
    assert heads.compiled_chain is None  # the eager engine never compiled it

    def boom(self, depths, dtype):
        raise RuntimeError("inductor said no")

    monkeypatch.setattr(CompiledDraftChain, "warm_up", boom)
    with caplog.at_level(logging.WARNING, logger=compiled_draft.__name__):
        assert compile_draft_chain(heads, eager.model, "default", 2, torch.float64) is None
    assert heads.compiled_chain is None
    assert "drafting without compilation" in caplog.text


def test_only_chain_attention_sequential_heads_compile(engines):
    eager, _ = engines
    ctx = chain_heads(eager.model_config, context=True)
    assert compile_draft_chain(ctx, eager.model, "default", 2, torch.float64) is None
    assert ctx.compiled_chain is None
    assert compile_draft_chain(object(), eager.model, "default", 2, torch.float64) is None


def test_extend_compiles_only_the_missing_depths(engines, monkeypatch, caplog):
    """--tree auto compiles a depth as its timing reaches it (CompiledDraftChain.extend);
    a depth compiled already is not compiled again; a failure leaves it eager."""
    _, eng = engines
    chain = eng.heads.compiled_chain
    before = chain.compiles
    chain.extend(2)
    assert chain.compiles == before  # depths 1-2 are warm
    chain.extend(3)
    assert chain.depths == {1, 2, 3} and chain.compiles == before + 1
    monkeypatch.setattr(CompiledDraftChain, "warm_up",
                        lambda self, depths, dtype: 1 / 0)
    with caplog.at_level(logging.WARNING, logger=compiled_draft.__name__):
        chain.extend(5)
    assert 5 not in chain.depths and "depth(s) [4, 5] failed" in caplog.text
    hidden = torch.randn(2, eng.model_config.hidden_size, dtype=torch.float64)
    tokens, pos0 = torch.tensor([1, 2]), torch.tensor([3, 4])
    assert torch.equal(chain(hidden, tokens, pos0, 5),
                       eng.heads.chain_tops(hidden, tokens, pos0, 5, eng.model))
