"""decoding/training/prompt_set/ (build.py): the #24 prompt set is deterministic for a seed,
large, covers every category, reads as train-heads data, and never touches the held-out
prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mtpserve.decoding.training.heads_data import messages_key, read_sources

DATA = Path(__file__).resolve().parents[2] / "decoding" / "training" / "data"


def _script():
    from mtpserve.decoding.training.prompt_set import build

    return build


@pytest.fixture(scope="module")
def made():
    mod = _script()
    return mod, mod.build(seed=0)


def test_deterministic_for_a_seed_and_another_seed_differs(made):
    mod, recs = made
    assert mod.build(seed=0) == recs
    other = mod.build(seed=1)
    assert other != recs and len(other) == len(recs)


def test_at_least_8000_unique_prompts_in_every_category(made):
    mod, recs = made
    keys = {messages_key(mod.conversation(r)) for r in recs}
    assert len(keys) == len(recs) >= 8000
    counts = {c: sum(r["category"] == c for r in recs) for c in mod.CATEGORIES}
    assert counts == mod.QUOTA
    multi = [r for r in recs if "messages" in r]
    assert multi and all([m["role"] for m in r["messages"]] == ["user", "assistant", "user"]
                         for r in multi)


def test_disjoint_from_the_heldout_prompts(made):
    mod, recs = made
    held = mod.heldout_texts()
    assert len(held) == 8
    users = {mod.normalize(m["content"]) for r in recs for m in mod.conversation(r)
             if m["role"] == "user"}
    assert not users & held
    for r in recs:
        text = " ".join(m["content"] for m in mod.conversation(r)).lower()
        assert not any(f" {t} " in f" {text} " for t in ("guitar", "rainbow", "alligator")), r


def test_committed_file_is_the_seed_0_output_and_reads_as_prompts(made, tmp_path):
    mod, recs = made
    committed = DATA / "prompt_set.jsonl"
    lines = committed.read_text(encoding="utf-8").splitlines()
    assert [json.loads(x) for x in lines] == recs

    class NoTokenizer:  # prompts are only read, never encoded
        def encode(self, text):
            raise AssertionError("prompts must not be encoded as text")

    sample = tmp_path / "sample.jsonl"
    sample.write_text("\n".join(lines[:50]) + "\n", encoding="utf-8")
    src = read_sources([str(sample)], NoTokenizer())
    assert len(src.prompts) == 50 and not src.examples
