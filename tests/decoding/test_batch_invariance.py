"""Batch-invariant mode (EngineConfig.batch_invariant, `--batch-invariant auto|on`).

The rule, per kernel: a row's result is BITWISE the same whatever else shares the pass
(linear.row_invariant; attention.attend_invariant for decode rows, tree nodes and rows
beside other sequences). End to end at the default weights (int4 on CPU): speculative
greedy equals plain greedy token for token over 128 tokens with trees of several shapes
(and a decoy-first tree that moves K/V), and a sequence's greedy tokens are the same alone
and in a batch of other sequences arriving and finishing at other steps.

The end-to-end tests run the default engine (`--batch-invariant auto`, on at these
weights) eagerly and compiled (`--compile on`: one graph for every row count).
MTPSERVE_TEST_BATCH_INVARIANT=off runs them with the mode off, to see them fail (the
near-ties of these prompts flip without it). The engine attends with the row
kernel where it loads (--attention-kernel auto, model/row_attention.py);
MTPSERVE_TEST_ATTENTION_KERNEL=sdpa runs them through attend_invariant instead.
"""

from __future__ import annotations

import os

import pytest
import torch

from decoding_helpers import chat, random_causal_lm, run_requests, tiny_config
from mtpserve.decoding.config import EngineConfig, SamplingParams, SpecConfig
from mtpserve.decoding.model import attention as attn
from mtpserve.decoding.model.attention_metadata import AttentionMetadata, padded_layout
from mtpserve.decoding.model.kv_cache import KVCache
from mtpserve.decoding.model.linear import (WIDE_ROWS, ChunkRows, Linear, chunk_rows,
                                            row_invariant)
from mtpserve.decoding.spec.tree import DraftTree, load_choices

N = 128
PROMPTS = ["Write a short story about a robot who learns to paint.",
           "Explain how a refrigerator works, step by step."]


# -- the rule, per kernel ------------------------------------------------------------------------
def _linear(fmt: str, k: int = 576, n: int = 192) -> Linear:
    lin = Linear(k, n, bias=False)
    lin.set_weight(torch.randn(n, k, generator=torch.Generator().manual_seed(1)) * 0.05)
    if fmt == "int4":
        lin.quantize_int4(wide_copy=True)
    else:
        lin.quantize_int8(wide_copy=True)
    return lin


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_quantized_layer_in_invariant_mode_meets_the_row_rule(fmt):
    """Any pass size, including the wide copy's range: the layer keeps its one kernel."""
    lin = _linear(fmt)
    assert lin.set_row_invariant()
    assert row_invariant(lin, lin.in_features, torch.float32, rows=(2, WIDE_ROWS, 16, 40, 130))


def test_the_wide_copy_breaks_the_rule_the_mode_exists_for():
    """Without the mode a pass of WIDE_ROWS+ rows multiplies by the bf16 copy: the same row
    rounds differently than alone (what the mode removes)."""
    lin = _linear("int4")
    if lin.wide_weight is None:
        pytest.skip("no bf16 wide copy on this machine")
    assert not row_invariant(lin, lin.in_features, torch.float32, rows=(WIDE_ROWS,))


def test_the_rule_catches_a_kernel_that_depends_on_the_row_count():
    def by_count(x):  # a different reduction order from 2 rows on
        return x.sum(-1, keepdim=True) if len(x) == 1 else x.flip(-1).cumsum(-1)[:, -1:]

    assert row_invariant(lambda x: x.sum(-1, keepdim=True), 300, torch.float32)
    assert not row_invariant(by_count, 300, torch.float32)


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_a_prefill_chunk_gets_the_same_bits_alone_and_beside_other_rows(fmt):
    """In the mode a chunk of WIDE_ROWS+ rows goes through the wide copy ALONE (ChunkRows):
    its rows equal the chunk's pass by itself, whatever other chunks and decode rows share
    the pass, and every other row keeps its one-row bits."""
    lin = _linear(fmt)
    if lin.wide_weight is None:
        pytest.skip("no bf16 wide copy on this machine")
    assert lin.set_row_invariant()
    g = torch.Generator().manual_seed(5)
    chunk, other, rows = torch.randn(40, 576, generator=g), torch.randn(17, 576, generator=g), 3
    with chunk_rows(ChunkRows((slice(None),), None)):
        alone = lin(chunk)
        alone_other = lin(other)
    singles = torch.cat([lin(x[None]) for x in (chunk[0], chunk[1], chunk[2])])
    assert not torch.equal(alone[:rows], singles)  # the chunk's own kernel (else no test)
    # pass: 3 decode rows, the chunk, the other chunk
    x = torch.cat([chunk[:rows] + 1, chunk, other])
    plan = ChunkRows((torch.arange(rows, rows + 40), torch.arange(rows + 40, rows + 57)),
                     torch.arange(rows))
    with chunk_rows(plan):
        y = lin(x)
    assert torch.equal(y[rows:rows + 40], alone) and torch.equal(y[rows + 40:], alone_other)
    assert torch.equal(y[:rows], torch.cat([lin(r[None]) for r in x[:rows]]))
    assert torch.equal(lin(x), torch.cat([lin(r[None]) for r in x]))  # no plan: one kernel


def test_invariant_model_reports_no_failing_kernel_at_int4():
    model = random_causal_lm(tiny_config(vocab=300, hidden=64), dtype=torch.float32, seed=2)
    model.quantize("int4", wide_copy=True)
    model.use_transposed_weights()
    assert model.set_batch_invariant(True) == []
    assert all(layer.self_attn.batch_invariant for layer in model.layers)


def test_attention_primitives_are_shape_invariant():
    """What attend_invariant relies on: fixed-shape bmm entries give the same bits whatever
    the batch count; exp and the fixed-width block sum whatever the tensor's size."""
    g = torch.Generator().manual_seed(0)
    C = attn.INVARIANT_BLOCK
    q, k = torch.randn(50, 3, 64, generator=g), torch.randn(50, 64, C, generator=g)
    one = torch.stack([q[i] @ k[i] for i in range(50)])
    p = torch.rand(50, 3, C, generator=g)
    v = torch.randn(50, C, 64, generator=g)
    pv = torch.stack([p[i] @ v[i] for i in range(50)])
    for b in (1, 2, 7, 50):
        assert torch.equal(torch.matmul(q[:b], k[:b]), one[:b]), b
        assert torch.equal(torch.matmul(p[:b], v[:b]), pv[:b]), b
    x = torch.randn(97, C, generator=g) * 10
    e1, s1 = torch.cat([x[i:i + 1].exp() for i in range(97)]), torch.stack([x[i].sum() for i in range(97)])
    for m in (2, 5, 64, 97):
        assert torch.equal(x[:m].exp(), e1[:m]) and torch.equal(x[:m].sum(-1), s1[:m]), m


def _meta(mask, kv_len, counts):
    qg, qs = padded_layout(counts)
    e = torch.empty(0, dtype=torch.long)
    return AttentionMetadata(positions=e, token_slots=e, token_store=e,
                             seq_slots=torch.arange(len(counts)), slot_start=0, kv_len=kv_len,
                             num_seqs=len(counts), q_len=max(counts), q_gather=qg,
                             q_scatter=qs, mask=mask)


def _cache(k, v):
    kv = KVCache.__new__(KVCache)
    kv.buf = torch.stack([k, v])[None]  # one layer: [1, 2, B, Hkv, L, D]
    return kv


def test_flat_gather_gives_the_keys_advanced_indexing_gives():
    """kv.gather_flat (one index_select of D-rows, K and V together) copies exactly the
    entries buf[layer, k/v][slot, head, idx] that attend_invariant reduces over."""
    g = torch.Generator().manual_seed(3)
    kv = KVCache.__new__(KVCache)
    kv.buf = torch.randn(2, 2, 5, 3, 70, 8, generator=g)  # [layer, k/v, slot, head, idx, D]
    slots = torch.tensor([4, 0, 2, 2])
    idx = torch.randint(0, 70, (4, 64), generator=g)
    got = kv.gather_flat(1, kv.flat_index(slots, idx))
    heads = torch.arange(3)
    at = (slots[:, None, None], heads[None, :, None], idx[:, None, :])
    assert torch.equal(got[0], kv.buf[1, 0][at]) and torch.equal(got[1], kv.buf[1, 1][at])


@pytest.mark.parametrize("start", [5, 31, 32, 141, 700])
def test_attend_invariant_gives_a_tree_node_the_decode_rows_bits(start):
    """A decode row at position start+3 over keys [0, start+3] vs (a) the same query as the
    deepest node of a decoy-first tree (decoys between its ancestors in the cache), (b) the
    same row beside sequences with longer and shorter contexts; and close to SDPA."""
    g = torch.Generator().manual_seed(start)
    Hq, Hkv, D, S = 6, 2, 16, start + 40
    k, v = torch.randn(3, Hkv, S, D, generator=g), torch.randn(3, Hkv, S, D, generator=g)
    q = torch.randn(1, Hq, D, generator=g)
    pos = start + 3
    ref = attn.attend_invariant(q, _cache(k[:1, :, :pos + 1], v[:1, :, :pos + 1]), 0,
                                _meta(None, pos + 1, [1]), 0.25)
    sdpa = attn.attend(q, k[:1, :, :pos + 1], v[:1, :, :pos + 1], _meta(None, pos + 1, [1]), 0.25)
    torch.testing.assert_close(ref, sdpa, rtol=1e-5, atol=1e-6)
    # (a) tree: root, decoy, true child, decoy, true grandchild, query under it
    parents, path = [-1, 0, 0, 2, 2, 4], [0, 2, 4, 5]
    tk, tv = k[1:2].clone(), v[1:2].clone()
    tk[..., :start, :], tv[..., :start, :] = k[0, :, :start], v[0, :, :start]
    for d, node in enumerate(path):
        tk[..., start + node, :], tv[..., start + node, :] = k[0, :, start + d], v[0, :, start + d]
    tree = DraftTree(tokens=[0] * 6, parents=parents)
    n, L = 6, start + 6
    mask = torch.zeros(1, 1, n, L, dtype=torch.bool)
    mask[..., :start] = True
    mask[0, 0, :, start:] = tree.ancestor_mask()
    qs = torch.randn(n, Hq, D, generator=g)
    qs[5] = q[0]
    out = attn.attend_invariant(qs, _cache(tk[..., :L, :], tv[..., :L, :]), 0,
                                _meta(mask, L, [n]), 0.25)
    assert torch.equal(out[5], ref[0])
    # (b) beside a longer and a shorter sequence (padded keys past this row's length)
    lens = [start + 30, pos + 1, max(1, start - 3)]
    L = max(lens)
    kb, vb = k.clone(), v.clone()
    kb[1], vb[1] = k[0], v[0]
    mask = torch.zeros(3, 1, 1, L, dtype=torch.bool)
    for b, ln in enumerate(lens):
        mask[b, 0, 0, :ln] = True
    qs = torch.randn(3, Hq, D, generator=g)
    qs[1] = q[0]
    kb[1, :, pos + 1:], vb[1, :, pos + 1:] = 1e4, -1e4  # garbage past its length: masked
    out = attn.attend_invariant(qs, _cache(kb[..., :L, :], vb[..., :L, :]), 0,
                                _meta(mask, L, [1, 1, 1]), 0.25)
    assert torch.equal(out[1], ref[0])


# -- end to end at the default weights ---------------------------------------------------------
@pytest.fixture(scope="module", params=["eager", "compiled"])
def inv_engine(request):
    """The default engine (--batch-invariant auto: on at these weights), eager and with
    --compile on (one graph for every row count, model/compiled.py)."""
    from mtpserve.decoding.engine.llm_engine import LLMEngine

    mode = os.environ.get("MTPSERVE_TEST_BATCH_INVARIANT", "auto")  # off: see them fail
    kernel = os.environ.get("MTPSERVE_TEST_ATTENTION_KERNEL", "auto")  # sdpa: attend_invariant
    compiled = request.param == "compiled"
    eng = LLMEngine.from_config(EngineConfig(max_num_seqs=6, max_model_len=512,
                                             batch_invariant=mode, attention_kernel=kernel,
                                             compile="on" if compiled else "off",
                                             spec=SpecConfig(mode="on")))
    assert eng.weight_format == "int4" or not torch.cuda.is_available()
    if mode == "auto" and kernel == "auto" and eng.device.type == "cpu":
        assert eng.model.batch_invariant  # the default is on where the kernels make it free
    assert (eng.compiled is not None) == compiled
    return eng


@pytest.fixture(scope="module")
def plain_runs(inv_engine):
    prompts = [chat(inv_engine.tokenizer, t) for t in PROMPTS]
    runs = run_requests(inv_engine, [(p, _greedy(N, speculate=False)) for p in prompts])
    return prompts, [r.token_ids for r in runs]


def _greedy(n: int, speculate: bool) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, speculate=speculate)


def _first_diff(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


# tree16 itself is covered by decoy-first (its paths plus a wrong first branch)
@pytest.mark.parametrize("tree", ["chain4", "decoy-first"])
def test_speculative_greedy_equals_plain_greedy_at_int4(inv_engine, plain_runs, tree):
    eng = inv_engine
    prompts, plain = plain_runs
    policy = eng.policy
    saved_choices, saved_build = policy.choices, policy.build_tree
    vocab = eng.model_config.vocab_size

    def decoy_first(*args, **kwargs):  # a wrong branch as the root's FIRST child
        real = saved_build(*args, **kwargs)
        tree = DraftTree.root_only(real.tokens[0])
        kids = [i for i, p in enumerate(real.parents) if p == 0]
        tree.add_path([(real.tokens[kids[0]] + 1) % vocab, 0] if kids else [1, 0])
        for leaf in range(1, len(real.tokens)):
            if leaf not in real.parents:  # every root-to-leaf path of the real tree
                path, j = [], leaf
                while j > 0:
                    path.append(real.tokens[j])
                    j = real.parents[j]
                tree.add_path(path[::-1])
        return tree

    policy.choices = load_choices("tree16" if tree == "decoy-first" else tree)
    if tree == "decoy-first":
        policy.build_tree = decoy_first
    try:
        spec = run_requests(eng, [(p, _greedy(N, speculate=True)) for p in prompts])
    finally:
        policy.choices = saved_choices
        policy.__dict__.pop("build_tree", None)
    accepted = sum(r.last.spec.num_accepted_draft_tokens for r in spec)
    assert accepted > 0  # it did speculate and accept
    for a, r in zip(plain, spec):
        b = r.token_ids
        assert b == a, f"{tree}: first difference at output {_first_diff(a, b)}"


def test_greedy_output_is_the_same_alone_and_in_a_batch_at_int4(inv_engine, plain_runs):
    """Prompt 0 alone (plain_runs) vs beside: a speculating sequence with another length
    that finishes early, a plain one, a sampled one, and one arriving at step 6."""
    eng = inv_engine
    prompts, plain = plain_runs
    other = [chat(eng.tokenizer, t) for t in ("Hi!", "Name four rivers in Europe and where "
                                               "they flow, with one sentence about each.")]
    batch = {"ref": (prompts[0], _greedy(N, speculate=False)),
             "spec-short": (other[0], _greedy(20, speculate=True)),
             "plain-long": (other[1], _greedy(60, speculate=False)),
             "sampled": (prompts[1], SamplingParams(max_tokens=40, temperature=0.8, seed=3))}
    late = ("late", prompts[1], _greedy(30, speculate=True))
    outs: dict[str, list[int]] = {k: [] for k in [*batch, late[0]]}
    finished_at: dict[str, int] = {}
    try:
        for rid, (p, sp) in batch.items():
            eng.add_request(rid, p, sp)
        for step in range(2000):
            if step == 6:
                eng.add_request(late[0], late[1], late[2])
            for o in eng.step():
                outs[o.request_id].extend(o.new_token_ids)
                if o.finished:
                    finished_at[o.request_id] = step
            if step > 6 and not eng._seqs:
                break
    finally:
        for rid in outs:
            eng.abort_request(rid)
    assert len(set(finished_at.values())) >= 3  # they finished at different steps
    assert outs["ref"] == plain[0], f"first difference at {_first_diff(outs['ref'], plain[0])}"
    assert outs["late"] == plain[1][:30]  # arrived mid-run, speculating: still its plain tokens


def test_a_padded_one_row_step_skips_the_padding_in_the_int4_kernel_with_the_same_bits(
        inv_engine, monkeypatch):
    """Compiled, a one-row step runs as two rows; the int4 kernel computes the real one
    only (int4_vnni.live_rows): greedy tokens and their logprobs are bitwise those of the
    step that computes the padding row too."""
    from contextlib import nullcontext

    from mtpserve.decoding.model import compiled, int4_vnni

    if inv_engine.compiled is None or not int4_vnni.available():
        pytest.skip("the compiled engine with our int4 kernel only")
    prompt = chat(inv_engine.tokenizer, PROMPTS[0])
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, speculate=False,
                            logprobs=5)
    calls = []
    real = compiled.live_rows
    monkeypatch.setattr(compiled, "live_rows", lambda n, rows: calls.append((n, rows)) or
                        real(n, rows))
    skipped = run_requests(inv_engine, [(prompt, params)])[0]
    assert calls.count((1, 2)) >= 23  # every decode step was a padded one-row pass
    monkeypatch.setattr(compiled, "live_rows", lambda n, rows: nullcontext())
    computed = run_requests(inv_engine, [(prompt, params)])[0]
    assert skipped.token_ids == computed.token_ids
    lp = lambda run: [(t.token_id, t.logprob, t.top) for o in run.outputs  # noqa: E731
                      for t in (o.logprobs or [])]
    assert lp(skipped) == lp(computed) and len(lp(skipped)) == 24


def test_the_invariant_engine_attends_with_the_row_kernel(inv_engine):
    from mtpserve.decoding.model import row_attention

    want = os.environ.get("MTPSERVE_TEST_ATTENTION_KERNEL", "auto")
    if want == "sdpa" or not row_attention.available():
        pytest.skip("the row kernel is off or does not load here")
    layers = inv_engine.model.layers
    assert inv_engine.model.attention_kernel == "rows"
    assert all(layer.self_attn.row_kernel for layer in layers)


def test_the_row_rule_is_checked_once_per_kind_of_layer(monkeypatch):
    """The rule is the kernel's at a shape: one check per Linear.kernel_kind, and a failing
    kind reports every layer of it."""
    from mtpserve.decoding.model import linear

    model = random_causal_lm(tiny_config(vocab=300, hidden=64, layers=3), dtype=torch.float32,
                             seed=2)
    model.quantize("int4")
    model.use_transposed_weights()
    layers = [m for m in model.layers.modules() if isinstance(m, linear.Linear)]
    kinds = {m.kernel_kind() for m in layers}
    calls = []
    real = linear.row_invariant
    monkeypatch.setattr(linear, "row_invariant",
                        lambda mm, *a, **kw: calls.append(mm) or real(mm, *a, **kw))
    assert model.set_batch_invariant(True) == []
    assert len(calls) == len(kinds) < len(layers)
    assert all(m.invariant for m in layers)
    down = model.layers[0].mlp.down_proj.kernel_kind()
    monkeypatch.setattr(linear, "row_invariant",
                        lambda mm, *a, **kw: mm.kernel_kind() != down)
    failing = model.set_batch_invariant(True)
    assert failing == [f"layers.{i}.mlp.down_proj (int4)" for i in range(3)]
