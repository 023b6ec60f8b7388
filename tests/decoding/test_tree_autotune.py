"""`--tree auto` (engine/tree_autotune.py): the tree for these heads measured on this
machine at the first start, cached under the user's cache folder and read back at the
next start; heads without held-out accuracies, `--tree default` and a failing measurement
keep the heads' own tree. A tiny random model and untrained sequential heads whose
heads.json carries made-up accuracies: what is tested is the choice and its cache, not
the heads."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from decoding_helpers import random_causal_lm, tiny_config
from mtpserve.decoding.config import EngineConfig, SpecConfig
from mtpserve.decoding.engine import tree_autotune
from mtpserve.decoding.engine.llm_engine import LLMEngine
from mtpserve.decoding.spec.heads_io import save_project_heads
from mtpserve.decoding.spec.mtp_sequential import SequentialMTPHeads

SURE = [[0.95, 0.03, 0.01, 0.01]] * 3  # drafts almost always right: big trees pay
HOPELESS = [[0.01, 0.01, 0.01, 0.01]] * 3  # almost never: the smallest tree costs least


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "mtpserve" / "trees"


def _engine(tokenizer, tmp_path, rank_acc, tree: str = "auto", name: str = "heads"):
    cfg = tiny_config(vocab=tokenizer.vocab_size, hidden=32, layers=2, heads=4, kv_heads=2,
                      tie_word_embeddings=False)
    model = random_causal_lm(cfg, torch.float64, seed=0)
    heads = SequentialMTPHeads.new(cfg, num_modules=1, default_tree="chain2", context=False)
    torch.manual_seed(0)
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.02)
    folder = tmp_path / name
    save_project_heads(heads, folder, cfg, training={"heldout": {"rank_acc": rank_acc}})
    config = EngineConfig(dtype="float64", device="cpu", max_num_seqs=2, max_model_len=512,
                          spec=SpecConfig(mode="on", proposer="heads", tree=tree,
                                          heads_path=str(folder)))
    return LLMEngine(config, model, tokenizer, "tiny", heads=heads.to(torch.float64).eval()), folder


def test_auto_measures_once_then_reads_the_cache(default_engine, tmp_path, cache_home, monkeypatch,
                                                 caplog):
    with caplog.at_level(logging.INFO):
        eng, folder = _engine(default_engine.tokenizer, tmp_path, SURE)
    entries = list(cache_home.glob("*.json"))
    assert len(entries) == 1
    saved = json.loads(entries[0].read_text())
    assert eng.policy.choices == [tuple(c) for c in saved["best"]["choices"]]
    assert saved["best"] == saved["top"][0]  # the best expected speed of the ranking
    assert set(saved["verify_ms"]) >= {"1", str(saved["best"]["nodes"])}
    assert saved["key"]["compiled"] is False and saved["key"]["draft_compiled"] is False
    assert saved["key"]["threads"] == torch.get_num_threads()
    assert any("--tree auto: timing verify passes" in r.getMessage() for r in caplog.records)

    def no_measuring(*a, **kw):
        raise AssertionError("measured again although the cache holds this machine's choice")

    measure = tree_autotune.measure_and_rank
    monkeypatch.setattr(tree_autotune, "measure_and_rank", no_measuring)
    again, _ = _engine(default_engine.tokenizer, tmp_path, SURE)
    assert again.policy.choices == eng.policy.choices
    # another version of our kernels (their sources' digest) is another key: measured again
    monkeypatch.setattr(tree_autotune, "measure_and_rank", measure)
    monkeypatch.setattr(tree_autotune, "kernels_digest", lambda: "another-kernel-version")
    _engine(default_engine.tokenizer, tmp_path, SURE)
    keys = [json.loads(p.read_text())["key"]["kernels"] for p in cache_home.glob("*.json")]
    assert sorted(keys) == sorted([saved["key"]["kernels"], "another-kernel-version"])
    monkeypatch.setattr(tree_autotune, "measure_and_rank", no_measuring)
    # other heads (another heads.json) are another key: measured, here failing -> default
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        other, _ = _engine(default_engine.tokenizer, tmp_path, HOPELESS, name="other")
    assert any("--tree auto: calibration failed" in r.getMessage() for r in caplog.records)
    assert [tuple(c) for c in other.policy.choices] == [(0,), (0, 0)]  # chain2, the default


def test_the_cached_choice_is_read_without_measuring(default_engine, tmp_path, cache_home,
                                                     monkeypatch):
    """cached_tree (what the engine compiles its draft depths for before --tree auto runs):
    this machine's cached choice, read without timing anything; None where the cache has no
    entry for that key (drafting compiled or not is part of it) or the entry is unreadable."""
    eng, _ = _engine(default_engine.tokenizer, tmp_path, SURE)
    monkeypatch.setattr(tree_autotune, "measure_and_rank", lambda *a, **k: 1 / 0)
    assert tree_autotune.cached_tree(eng) == [tuple(c) for c in eng.policy.choices]
    assert tree_autotune.cached_tree(eng, draft_compiled=True) is None  # another key
    (entry,) = cache_home.glob("*.json")
    entry.write_text("{not json")
    assert tree_autotune.cached_tree(eng) is None


def test_the_choice_follows_the_accuracies_and_the_costs(default_engine, tmp_path, cache_home,
                                                         monkeypatch):
    """With verify passes that cost about the same up to 17 rows and cheap drafting (a
    GPU-like curve), heads that are almost always right get a big, deep tree and hopeless
    ones a smaller one of depth 1; where drafting costs as much as the pass, even sure
    heads get one node."""
    def flat_verify(engine, filler, context, ks, runs):
        return [{"k": k, "ms": 99.0, "ms_min": 10.0 + 0.01 * k} for k in ks]

    monkeypatch.setattr(tree_autotune, "verify_times", flat_verify)
    monkeypatch.setattr(tree_autotune, "draft_times",
                        lambda engine, depths, context, runs, first=1: {d: 0.1 * d for d in range(first, depths + 1)})
    sure, _ = _engine(default_engine.tokenizer, tmp_path, SURE, name="sure")
    hopeless, _ = _engine(default_engine.tokenizer, tmp_path, HOPELESS, name="hopeless")
    assert len(sure.policy.choices) >= 8 and max(len(c) for c in sure.policy.choices) == 3
    assert len(hopeless.policy.choices) < len(sure.policy.choices)
    assert max(len(c) for c in hopeless.policy.choices) == 1  # no depth 2: it would not pay
    assert sure.policy.max_depth >= 3 and len(sure.policy.depth_accept) == sure.policy.max_depth
    monkeypatch.setattr(tree_autotune, "draft_times",
                        lambda engine, depths, context, runs, first=1: {d: 10.0 * d for d in range(first, depths + 1)})
    for f in cache_home.glob("*.json"):  # the same heads.json: another machine, say
        f.unlink()
    dear, _ = _engine(default_engine.tokenizer, tmp_path, SURE, name="dear")
    assert dear.policy.choices == [(0,)]


def test_deeper_drafts_are_timed_only_while_a_deeper_tree_can_win(default_engine, tmp_path,
                                                                 cache_home, monkeypatch):
    """At a first start --tree auto times (and, compiled, compiles) drafting one depth at a
    time and stops where no deeper tree can pay; the served tree's depths are timed."""
    timed: list[int] = []

    def draft_times(engine, depths, context, runs, first=1):
        timed.extend(range(first, depths + 1))
        return {d: 0.1 * d for d in range(first, depths + 1)}

    def verify(ms_per_row):
        return lambda engine, filler, context, ks, runs: [
            {"k": k, "ms": 99.0, "ms_min": 10.0 + ms_per_row * k} for k in ks]

    monkeypatch.setattr(tree_autotune, "draft_times", draft_times)
    monkeypatch.setattr(tree_autotune, "verify_times", verify(0.01))
    sure, _ = _engine(default_engine.tokenizer, tmp_path, SURE, name="sure")
    assert timed == [1, 2, 3] and max(len(c) for c in sure.policy.choices) == 3
    timed.clear()
    monkeypatch.setattr(tree_autotune, "verify_times", verify(5.0))  # a node: half a step
    hopeless, _ = _engine(default_engine.tokenizer, tmp_path, HOPELESS, name="hopeless")
    assert timed == [1] and hopeless.policy.choices == [(0,)]
    (entry,) = [p for p in cache_home.glob("*.json")
                if json.loads(p.read_text())["best"]["choices"] == [[0]]]
    assert list(json.loads(entry.read_text())["draft_ms"]) == ["1"]


def test_default_and_heads_without_accuracies_keep_the_heads_tree(default_engine, tmp_path,
                                                                   cache_home, monkeypatch):
    monkeypatch.setattr(tree_autotune, "measure_and_rank",
                        lambda *a, **kw: pytest.fail("--tree default measured"))
    eng, folder = _engine(default_engine.tokenizer, tmp_path, SURE, tree="default")
    assert eng.policy.choices == [(0,), (0, 0)]
    meta = json.loads((folder / "heads.json").read_text())
    meta.pop("training")
    (folder / "heads.json").write_text(json.dumps(meta))
    assert tree_autotune.heads_accuracies(folder) is None
    assert tree_autotune.autotune_tree(eng, folder) is None
    assert not cache_home.exists()


def test_verify_costs_are_made_non_decreasing():
    from mtpserve.decoding.spec.tree_choice import monotone_costs

    assert monotone_costs({1: 8.66, 2: 7.34, 3: 7.5, 5: 9.0}) == {1: 7.34, 2: 7.34, 3: 7.5,
                                                                    5: 9.0}
    assert monotone_costs({1: 5.0, 2: 6.0, 4: 5.5, 8: 9.0}) == {1: 5.0, 2: 5.5, 4: 5.5, 8: 9.0}
    assert monotone_costs({1: 5.0}) == {1: 5.0}


def test_a_slow_moment_at_one_row_does_not_make_drafting_look_free(default_engine, tmp_path,
                                                                   cache_home, monkeypatch):
    """Plain decoding timed during a slow spell (k=1 dearer than k=2): priced at k=2's cost,
    so hopeless heads still get the smallest tree, and the cache keeps what was measured."""
    def spiky_verify(engine, filler, context, ks, runs):
        return [{"k": k, "ms": 99.0, "ms_min": 20.0 if k == 1 else 10.0 + 0.5 * k} for k in ks]

    monkeypatch.setattr(tree_autotune, "verify_times", spiky_verify)
    monkeypatch.setattr(tree_autotune, "draft_times",
                        lambda engine, depths, context, runs, first=1: {d: 0.5 * d for d in range(first, depths + 1)})
    eng, _ = _engine(default_engine.tokenizer, tmp_path, HOPELESS, name="spiky")
    assert eng.policy.choices == [(0,)]
    (entry,) = cache_home.glob("*.json")
    saved = json.loads(entry.read_text())
    assert saved["verify_ms_measured"]["1"] == 20.0 and saved["verify_ms"]["1"] == 11.0
    assert saved["best"]["speedup_vs_plain"] < 1.0  # the truth: drafting does not pay here
