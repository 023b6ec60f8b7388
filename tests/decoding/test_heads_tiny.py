"""Draft heads and invariant 2/4 on tiny random float64 models, where they hold exactly.

- heads checkpoints: project format round trip, the Medusa authors' layout, refusals;
- greedy speculative == plain greedy with RANDOM Medusa heads (only slower, never different)
  and with "oracle" heads that put the right token at a random rank among wrong ones (long
  accepted paths through branching trees, accepted branch often not the first one);
- decoy-first injected trees: the cache after each accepted path equals a fresh prefill, exactly;
- rejection sampling through the engine keeps the model's token distribution (chi-square).
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from torch import nn

from decoding_helpers import (greedy, prefill_hidden, random_causal_lm, randomize_, run_requests,
                              tiny_config, tiny_engine)
from mtpserve.decoding.config import EngineConfig, SamplingParams, SpecConfig
from mtpserve.decoding.engine.llm_engine import LLMEngine
from mtpserve.decoding.spec.heads import MedusaHeads
from mtpserve.decoding.spec.heads_io import load_heads, save_project_heads
from mtpserve.decoding.spec.tree import DraftTree


# -- checkpoints --------------------------------------------------------------------------------
def _small_cfg(**kw):
    return tiny_config(vocab=256, hidden=32, **kw)


@pytest.mark.parametrize("own", [False, True], ids=["shared-unembedding", "own-unembedding"])
def test_project_heads_round_trip(tmp_path, own):
    cfg = _small_cfg()
    heads = randomize_(MedusaHeads(32, 256, num_heads=3, num_layers=2, own_unembedding=own,
                                   default_tree="tree8"), seed=1)
    save_project_heads(heads, tmp_path / "h", cfg, training={"steps": 5})
    meta = json.loads((tmp_path / "h" / "heads.json").read_text())
    assert meta["base_fingerprint"] == cfg.fingerprint() and meta["own_unembedding"] == own
    for where in (tmp_path / "h", tmp_path / "h" / "heads.safetensors"):
        loaded = load_heads(where, cfg)
        assert (loaded.num_heads, loaded.num_layers, loaded.default_tree) == (3, 2, "tree8")
        assert (loaded.lm_heads is not None) == own
        a, b = heads.state_dict(), loaded.state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k].float(), b[k]) for k in a)
    # Distinct blocks per head (Medusa's `[ResBlock(h)] * n` shared them by mistake).
    w = [loaded.blocks[i][0].linear.weight for i in range(3)]
    assert w[0].data_ptr() != w[1].data_ptr() and not torch.equal(w[0], w[1])


def test_project_heads_refuse_a_foreign_base(tmp_path):
    cfg = _small_cfg()
    save_project_heads(MedusaHeads(32, 256, 2, 1), tmp_path / "h", cfg)
    with pytest.raises(ValueError, match="hidden 32"):
        load_heads(tmp_path / "h", tiny_config(vocab=256, hidden=64))
    with pytest.raises(ValueError, match="belong to base model"):
        load_heads(tmp_path / "h", _small_cfg(layers=3))  # same shapes, other trunk
    meta = json.loads((tmp_path / "h" / "heads.json").read_text())
    (tmp_path / "h" / "heads.json").write_text(json.dumps(meta | {"format": "other"}))
    with pytest.raises(ValueError, match="not an mtpserve-heads file"):
        load_heads(tmp_path / "h", cfg)
    with pytest.raises(ValueError, match="no draft heads"):
        load_heads(tmp_path / "nothing-here", cfg)


def test_project_heads_with_wrong_tensor_shape(tmp_path):
    from safetensors.torch import load_file, save_file

    cfg = _small_cfg()
    save_project_heads(MedusaHeads(32, 256, 2, 1), tmp_path / "h", cfg)
    f = tmp_path / "h" / "heads.safetensors"
    t = load_file(str(f))
    t["blocks.1.0.linear.weight"] = torch.zeros(32, 16)
    save_file(t, str(f))
    with pytest.raises(ValueError, match="blocks.1.0.linear.weight") as exc:
        load_heads(tmp_path / "h", cfg)
    assert str(f) in str(exc.value)


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
@pytest.mark.parametrize("own", [True, False], ids=["own-lm-head", "no-lm-head"])
def test_medusa_authors_layout(tmp_path, fmt, own):
    """config.json with medusa_num_heads + medusa_lm_head.{safetensors,pt} whose keys are
    `{head}.{layer}.linear.*` for the ResBlocks and `{head}.{num_layers}.weight` for the head."""
    cfg = _small_cfg()
    n, layers = 2, 1
    g = torch.Generator().manual_seed(0)
    raw = {}
    for i in range(n):
        raw[f"{i}.0.linear.weight"] = torch.randn(32, 32, generator=g)
        raw[f"{i}.0.linear.bias"] = torch.randn(32, generator=g)
        if own:
            raw[f"{i}.{layers}.weight"] = torch.randn(256, 32, generator=g)
    (tmp_path / "config.json").write_text(json.dumps({"medusa_num_heads": n,
                                                      "medusa_num_layers": layers}))
    if fmt == "safetensors":
        from safetensors.torch import save_file
        save_file(raw, str(tmp_path / "medusa_lm_head.safetensors"))
    else:
        torch.save(raw, tmp_path / "medusa_lm_head.pt")
    heads = load_heads(tmp_path, cfg)
    assert heads.num_heads == n and (heads.lm_heads is not None) == own
    assert torch.equal(heads.blocks[1][0].linear.weight, raw["1.0.linear.weight"])
    assert torch.equal(heads.blocks[0][0].linear.bias, raw["0.0.linear.bias"])
    if own:
        assert torch.equal(heads.lm_heads[1].weight, raw["1.1.weight"])


def test_medusa_layout_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"medusa_num_heads": 2}))
    with pytest.raises(ValueError, match="medusa_lm_head"):
        load_heads(tmp_path, _small_cfg())


# -- invariant 2 with heads, exact in float64 --------------------------------------------------
PROMPTS = [[11, 12, 13, 14, 15, 16, 17], [300, 301], [5, 6, 7, 5, 6, 7, 5, 6, 7, 5], [42] * 4]
MAX = 24


@pytest.fixture(scope="module")
def tok(default_engine):
    return default_engine.tokenizer


@pytest.fixture(scope="module")
def plain_ref(tok):
    eng = tiny_engine(tok, seed=3)
    runs = [run_requests(eng, [(p, greedy(MAX, ignore_eos=True, speculate=False))])[0]
            for p in PROMPTS]
    return [r.token_ids for r in runs]


def _random_medusa(vocab: int, seed: int) -> MedusaHeads:
    return randomize_(MedusaHeads(32, vocab, num_heads=4, num_layers=1, topk=4,
                                  default_tree="tree16"), seed=seed, std=1.0)


class OracleHeads(nn.Module):
    """Heads that know the reference continuation: the right token at a random rank among
    wrong ones, sometimes not at all. Keyed by the last token (collisions only cost speed)."""

    num_heads = 4
    default_tree = "tree16"

    def __init__(self, refs: list[list[int]], vocab: int, seed: int) -> None:
        super().__init__()
        self.rng = random.Random(seed)
        self.vocab = vocab
        self.next: dict[int, list[int]] = {}
        for seq in refs:
            for j, t in enumerate(seq):
                self.next.setdefault(t, seq[j + 1:j + 1 + self.num_heads])

    def candidates(self, hidden, model, last_tokens, num_heads=None, positions=None):
        out = []
        for last in last_tokens:
            truth = self.next.get(last, [])
            per_depth = []
            for d in range(self.num_heads if num_heads is None else num_heads):
                cands = [self.rng.randrange(self.vocab) for _ in range(4)]
                if d < len(truth) and self.rng.random() < 0.85:
                    cands[self.rng.randrange(4)] = truth[d]
                per_depth.append(cands)
            out.append(per_depth)
        return out


def _check_same(runs, plain_ref):
    for run, ref in zip(runs, plain_ref):
        assert run.token_ids == ref
        assert run.last.finish_reason == "length"


def test_random_medusa_heads_never_change_greedy_output(tok, plain_ref):
    eng = tiny_engine(tok, heads=_random_medusa(tok.vocab_size, seed=4), proposer="hybrid",
                      seed=3)
    batch = run_requests(eng, [(p, greedy(MAX, ignore_eos=True)) for p in PROMPTS])
    _check_same(batch, plain_ref)
    drafted = sum(r.last.spec.num_draft_tokens for r in batch)
    steps = sum(r.last.spec.num_spec_steps for r in batch)
    assert steps > 0 and drafted / steps > 8  # full head trees were verified every step


def test_oracle_heads_accept_long_branching_paths_and_stay_exact(tok, plain_ref):
    heads = OracleHeads(plain_ref, tok.vocab_size, seed=5)
    eng = tiny_engine(tok, heads=heads, proposer="heads", seed=3)
    moved = []
    keep_path = eng.kv.keep_path

    def spy(slot, src, dst_start):  # record whether accepted entries had to move
        moved.append(src != list(range(dst_start, dst_start + len(src))))
        keep_path(slot, src, dst_start)

    eng.kv.keep_path = spy
    # Alone and together: the same tokens.
    alone = [run_requests(eng, [(p, greedy(MAX, ignore_eos=True))])[0] for p in PROMPTS[:2]]
    _check_same(alone, plain_ref[:2])
    batch = run_requests(eng, [(p, greedy(MAX, ignore_eos=True)) for p in PROMPTS])
    _check_same(batch, plain_ref)
    stats = [r.last.spec for r in batch]
    assert max(s.mean_acceptance_length for s in stats) > 1.5
    assert any(moved)  # some accepted branch was not the first nodes of its tree


def test_decoy_first_trees_commit_kv_exactly(tok, plain_ref):
    eng = tiny_engine(tok, seed=3)
    vocab = tok.vocab_size
    ref = plain_ref[0]
    rid = "tiny-decoy"
    rng = random.Random(9)
    eng.add_request(rid, PROMPTS[0], greedy(MAX, ignore_eos=True))
    try:
        emitted = [t for o in eng.step() for t in o.new_token_ids]
        seq = eng._seqs[rid]
        while len(seq.output_ids) + 5 <= MAX:
            n_out = len(seq.output_ids)
            k = rng.randrange(1, 4)
            truth = ref[n_out:n_out + k]
            tree = DraftTree.root_only(seq.token_ids[-1])
            # Decoys at every depth, inserted before and after the true branch.
            for d in range(k):
                decoy = truth[:d] + [(truth[d] + 1 + rng.randrange(50)) % vocab]
                tree.add_path(decoy)
            tree.add_path(truth)
            tree.add_path(truth[:1] + [(truth[0] + 7) % vocab])
            seq.draft = tree
            out = [o for o in eng.step() if o.request_id == rid]
            assert out[0].new_token_ids == ref[n_out:n_out + k + 1]
            emitted += out[0].new_token_ids
            committed = seq.token_ids[:-1]
            (h,), kv = prefill_hidden(eng.model, [committed])
            n = seq.num_cached
            assert n == len(committed)
            assert torch.allclose(eng.kv.buf[:, :, seq.slot, :, :n], kv.buf[:, :, 0, :, :n],
                                  atol=1e-12, rtol=0)
        while rid in eng._seqs:
            emitted += [t for o in eng.step() for t in o.new_token_ids]
        assert emitted == ref
    finally:
        eng.abort_request(rid)


# -- invariant 4 end to end: rejection sampling through the engine --------------------------------
def test_rejection_sampling_keeps_the_models_distribution(tok):
    """Tiny model with vocab 8, random own-unembedding heads whose top-3 cover much of it:
    the second and third tokens come out of verify steps (accepted drafts or bonus tokens)
    and must follow the model's marginals, computed exactly from prefills."""
    V, N = 8, 2000
    cfg = tiny_config(vocab=V, hidden=32, layers=2, heads=4, kv_heads=2, tie_word_embeddings=False)
    model = random_causal_lm(cfg, torch.float64, seed=12)
    heads = randomize_(MedusaHeads(32, V, num_heads=2, num_layers=1, own_unembedding=True,
                                   topk=3, default_tree="tree8"), seed=13).to(torch.float64)
    eng = LLMEngine(EngineConfig(dtype="float64", device="cpu", max_num_seqs=128, max_model_len=32,
                                 spec=SpecConfig(mode="on", proposer="heads")),
                    model, tok, "tiny-v8", heads=heads.eval())
    prompt = [1, 5, 3]
    params = [SamplingParams(max_tokens=3, temperature=1.0, seed=i, ignore_eos=True,
                             acceptance="rejection") for i in range(N)]
    runs = run_requests(eng, [(prompt, p) for p in params], max_steps=5000)
    seqs = [r.token_ids for r in runs]
    assert all(len(s) == 3 for s in seqs)
    assert runs[0].last.spec.acceptance_rule == "rejection"
    accepted = sum(r.last.spec.num_accepted_draft_tokens for r in runs)
    assert accepted > 0.2 * N  # drafts were accepted, not only bonus tokens sampled

    def probs(prefixes):
        hs, _ = prefill_hidden(model, prefixes)
        with torch.no_grad():
            return [torch.softmax(model.compute_logits(h[-1:]).double()[0], -1) for h in hs]

    p1 = probs([prompt])[0]
    p2 = probs([prompt + [a] for a in range(V)])  # p2[a] = p(t2 | t1 = a)
    p3 = probs([prompt + [a, b] for a in range(V) for b in range(V)])
    m2 = sum(p1[a] * p2[a] for a in range(V))
    m3 = sum(p1[a] * p2[a][b] * p3[a * V + b] for a in range(V) for b in range(V))
    crit = 24.322  # chi-square, 7 degrees of freedom, p = 0.001
    for pos, m in ((1, m2), (2, m3)):
        counts = torch.bincount(torch.tensor([s[pos] for s in seqs]), minlength=V).double()
        expected = N * m
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < crit, (pos, counts.tolist(), expected.tolist(), chi2)


def test_logprobs_under_speculation_match_plain_decoding(tok, plain_ref):
    """Each emitted token's logprob is read from the tree row that predicted it: with long
    accepted paths (oracle heads) they must equal plain decoding's, token by token."""
    params = dict(ignore_eos=True, logprobs=3)
    plain_eng = tiny_engine(tok, seed=3)
    plain, = run_requests(plain_eng, [(PROMPTS[0], greedy(MAX, speculate=False, **params))])
    spec_eng = tiny_engine(tok, heads=OracleHeads(plain_ref, tok.vocab_size, seed=6),
                           proposer="heads", seed=3)
    spec, = run_requests(spec_eng, [(PROMPTS[0], greedy(MAX, **params))])
    assert spec.token_ids == plain.token_ids == plain_ref[0]
    assert max(len(d) for d in spec.deltas) >= 3
    lp_plain = [lp for o in plain.outputs for lp in o.logprobs]
    lp_spec = [lp for o in spec.outputs for lp in o.logprobs]
    assert len(lp_spec) == len(lp_plain) == MAX
    for a, b in zip(lp_plain, lp_spec):
        assert a.token_id == b.token_id
        assert b.logprob == pytest.approx(a.logprob, abs=1e-5)
        assert [t for t, _ in b.top] == [t for t, _ in a.top]
        assert b.top[0][0] == b.token_id  # greedy: the chosen token is the most likely


def test_candidates_for_fewer_heads_are_the_first_heads_candidates():
    """Drafting only the depths a tree reads gives exactly those heads' candidates."""
    from decoding_helpers import random_causal_lm, tiny_config
    from mtpserve.decoding.spec.heads import MedusaHeads

    model = random_causal_lm(tiny_config(vocab=64, hidden=32), dtype=torch.float32, seed=1)
    heads = MedusaHeads(32, 64, 4, 1).eval()
    for i, blk in enumerate(heads.blocks):
        torch.nn.init.normal_(blk[0].linear.weight, std=0.3, generator=torch.Generator().manual_seed(i))
    hidden = torch.randn(3, 32, generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        full = heads.candidates(hidden, model, [1, 2, 3])
        two = heads.candidates(hidden, model, [1, 2, 3], num_heads=2)
        heads.set_draft_vocab(torch.arange(0, 64, 2))
        dv_full = heads.candidates(hidden, model, [1, 2, 3])
        dv_two = heads.candidates(hidden, model, [1, 2, 3], num_heads=2)
    assert [c[:2] for c in full] == two and len(two[0]) == 2
    assert [c[:2] for c in dv_full] == dv_two
    assert all(t % 2 == 0 for seq in dv_two for head in seq for t in head)
