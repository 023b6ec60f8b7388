"""The prepared-model cache (model/prepared_cache.py): a start reads the quantized, packed
model a previous start saved, and gets exactly the model it would have prepared; anything
stale, foreign or broken is a miss, never a wrong model."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from decoding_helpers import prefill_logits
from mtpserve.decoding.config import EngineConfig
from mtpserve.decoding.engine.engine_setup import load_model
from mtpserve.decoding.model import prepared_cache
from mtpserve.decoding.model.kernel_build import aligned64


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setattr(prepared_cache, "cache_folder", lambda: tmp_path / "prepared")
    return tmp_path / "prepared"


def test_a_start_reads_back_the_model_it_would_prepare(folder, caplog):
    cfg = EngineConfig(compile="off")
    first = load_model(cfg)
    if first.model.unembed_format != "q8":
        pytest.skip("the Q8 unembedding kernel does not run here: nothing is cached")
    assert not first.from_cache and len(list(folder.glob("*.pt"))) == 1
    second = load_model(cfg)
    assert second.from_cache
    ids = first.tokenizer.encode("The capital of France is")
    assert second.tokenizer.encode("The capital of France is") == ids
    assert (second.name, second.model.weight_format, second.model.int4_kernel) == (
        first.name, first.model.weight_format, first.model.int4_kernel)
    assert torch.equal(prefill_logits(second.model, ids), prefill_logits(first.model, ids))
    assert second.heads is not None  # the shipped heads load beside it as before

    # a broken entry is a miss that logs and is written again, never an error
    (entry,) = folder.glob("*.pt")
    entry.write_bytes(b"not a torch file")
    with caplog.at_level(logging.WARNING):
        third = load_model(cfg)
    assert not third.from_cache and "unreadable" in caplog.text
    assert torch.equal(prefill_logits(third.model, ids), prefill_logits(first.model, ids))
    assert load_model(cfg).from_cache


def test_entries_made_for_other_kernels_are_misses(folder):
    key = "k" * 24
    facts = {"weights": "int4", "int4_kernel": "vnni16"}
    assert prepared_cache.save_entry(key, facts, {"weights": "int4", "model": torch.ones(3)})
    assert prepared_cache.load_entry(key, lambda w: dict(facts))["model"].sum() == 3
    assert prepared_cache.load_entry(key, lambda w: {**facts, "int4_kernel": "aten"}) is None
    assert prepared_cache.load_entry("x" * 24, lambda w: dict(facts)) is None


def test_an_entry_under_another_name_is_a_miss(folder):
    prepared_cache.save_entry("a" * 24, {}, {"weights": "int4"})
    (folder / ("a" * 24 + ".pt")).rename(folder / ("b" * 24 + ".pt"))
    assert prepared_cache.load_entry("b" * 24, lambda w: {}) is None


def test_the_key_follows_the_checkpoint_settings_and_torch(tmp_path, monkeypatch):
    ckpt = tmp_path / "m.gguf"
    ckpt.write_bytes(b"GGUF" + bytes(100))
    key = prepared_cache.prepared_key({"weights": "auto"}, str(ckpt))
    assert prepared_cache.prepared_key({"weights": "auto"}, str(ckpt)) == key
    assert prepared_cache.prepared_key({"weights": "int8"}, str(ckpt)) != key
    os.utime(ckpt, ns=(1, 1))  # the file replaced (same size)
    assert prepared_cache.prepared_key({"weights": "auto"}, str(ckpt)) != key
    moved = prepared_cache.prepared_key({"weights": "auto"}, str(ckpt))
    monkeypatch.setattr(prepared_cache.torch, "__version__", "0.0.0")
    assert prepared_cache.prepared_key({"weights": "auto"}, str(ckpt)) != moved
    monkeypatch.undo()
    monkeypatch.setattr(prepared_cache, "sources_digest", lambda: "changed")
    assert prepared_cache.prepared_key({"weights": "auto"}, str(ckpt)) != moved


def test_pruning_keeps_the_most_recently_used(folder, monkeypatch):
    monkeypatch.setattr(prepared_cache, "KEEP", 10)  # saving prunes too
    for i, name in enumerate("abc"):
        prepared_cache.save_entry(name * 24, {}, {"weights": "int4"})
        os.utime(folder / f"{name * 24}.pt", (1000 + i, 1000 + i))
    prepared_cache.load_entry("a" * 24, lambda w: {})  # used now: the newest
    gone = prepared_cache.prune(2)
    assert [p.name for p in gone] == ["b" * 24 + ".pt"]
    assert sorted(p.stem[0] for p in folder.glob("*.pt")) == ["a", "c"]


def test_a_failed_save_only_logs(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")  # a file where the folder should be
    monkeypatch.setattr(prepared_cache, "cache_folder", lambda: blocker / "prepared")
    with caplog.at_level(logging.WARNING):
        assert prepared_cache.save_entry("a" * 24, {}, {"weights": "int4"}) is None
    assert "could not save" in caplog.text


def test_aligned64_copies_only_what_is_misaligned():
    base = torch.arange(200, dtype=torch.uint8)
    assert aligned64(base) is base or base.data_ptr() % 64
    shifted = base[1:129].view(2, 64)
    assert shifted.data_ptr() % 64 != 0
    fixed = aligned64(shifted)
    assert fixed.data_ptr() % 64 == 0 and torch.equal(fixed, shifted)
    halves = torch.arange(40, dtype=torch.float16)[3:35]
    assert aligned64(halves).data_ptr() % 64 == 0 and torch.equal(aligned64(halves), halves)
