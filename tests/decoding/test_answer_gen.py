"""answer_gen.py: greedy and sampled answers in one resumable cache, through the engine,
on a tiny random-weight HF folder (word-level tokenizer)."""

from __future__ import annotations

import json

import pytest

from mtpserve.decoding.config import EngineConfig, SpecConfig
from mtpserve.decoding.engine.llm_engine import LLMEngine
from mtpserve.decoding.training.answer_gen import answer_jobs, generate_answers, read_cache
from mtpserve.decoding.training.heads_data import messages_key
from decoding_helpers import interrupt_engine_after
from test_train_heads import _tiny_hf_folder, _word_prompts

PROMPTS = [[{"role": "user", "content": f"w{i} w{i + 1} w{i + 2}"}] for i in range(3, 13)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _tiny_hf_folder(tmp_path_factory.mktemp("tinyhf"))


def _engine(folder: str, seqs: int = 4) -> LLMEngine:
    return LLMEngine.from_config(EngineConfig(
        model=folder, dtype="float32", device="cpu", weights="dense", max_num_seqs=seqs,
        max_model_len=64, spec=SpecConfig(mode="off")))


def _answers(cache) -> dict[str, list[int]]:
    return {k: v["completion_ids"] for k, v in read_cache(cache).items()}


def test_greedy_default_keeps_the_old_cache_keys(folder, tmp_path):
    cache = tmp_path / "a.jsonl"
    ex, stats = generate_answers(_engine(folder), PROMPTS, cache, 6, chunk=3)
    recs = read_cache(cache)
    assert set(recs) == {messages_key(m) for m in PROMPTS}
    assert all(r["mode"] == "greedy" for r in recs.values())
    assert stats["answers"] == stats["answers_generated_now"] == 10
    assert stats["answer_tokens"] == stats["generated_tokens_now"] == sum(
        len(r["completion_ids"]) for r in recs.values())
    assert [e.ids[-len(recs[messages_key(m)]["completion_ids"]):] for e, m in zip(ex, PROMPTS)] \
        == [recs[messages_key(m)]["completion_ids"] for m in PROMPTS]  # data order


def test_sampled_answers_are_seeded_per_prompt_and_marked(folder, tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    ex, stats = generate_answers(_engine(folder), PROMPTS, a, 8, chunk=10, samples=2, seed=3)
    assert len(ex) == 30 and stats["answer_tokens_sampled"] > 0
    recs = read_cache(a)
    sampled = [r for r in recs.values() if r["mode"] == "sampled"]
    assert len(sampled) == 20 and all(r["temperature"] == 0.7 for r in sampled)
    assert {r["sample"] for r in sampled} == {0, 1}
    greedy = {r["key"]: r["completion_ids"] for r in recs.values() if r["mode"] == "greedy"}
    assert any(r["completion_ids"] != greedy[r["key"].split("/")[0]] for r in sampled)
    # Another batch layout (one at a time, another engine) asks for the same samples.
    generate_answers(_engine(folder, seqs=1), PROMPTS, b, 8, chunk=1, samples=2, seed=3,
                     greedy=False)
    got = _answers(b)
    assert got == {k: v for k, v in _answers(a).items() if "/" in k}
    other = {j.key for j in answer_jobs(PROMPTS, samples=2, seed=4)}
    assert not other & set(got)  # another seed: other samples


def test_interrupted_run_resumes_where_it_stopped(folder, tmp_path):
    ref = tmp_path / "ref.jsonl"
    generate_answers(_engine(folder), PROMPTS, ref, 8, chunk=4, samples=1)
    cache = tmp_path / "cut.jsonl"
    engine = _engine(folder)
    interrupt_engine_after(engine, 12)
    with pytest.raises(KeyboardInterrupt):
        generate_answers(engine, PROMPTS, cache, 8, chunk=4, samples=1)
    assert not engine.has_unfinished()  # the interrupted requests were aborted
    partial = _answers(cache)
    assert 0 < len(partial) < 20
    with cache.open("a") as fh:  # a write cut short by the interruption
        fh.write('{"key": "half')
    ex, stats = generate_answers(_engine(folder), PROMPTS, cache, 8, chunk=4, samples=1)
    assert stats["answers_generated_now"] == 20 - len(partial)
    assert _answers(cache) == _answers(ref)
    assert len(ex) == 20


def test_only_cached_refuses_missing_answers(folder, tmp_path):
    with pytest.raises(ValueError, match="generates nothing"):
        generate_answers(_engine(folder), PROMPTS, tmp_path / "none.jsonl", 4, only_cached=True)


def test_cli_generate_only_with_samples(tmp_path, capsys):
    from mtpserve.server.cli import main

    model = _tiny_hf_folder(tmp_path)
    prompts = _word_prompts(tmp_path, 9)
    out = tmp_path / "out"
    argv = ["train-heads", "--model", model, "--data", str(prompts), "--out", str(out),
            "--gen-batch", "2", "--gen-chunk", "3", "--gen-samples", "1",
            "--generate-max-tokens", "5", "--threads", "1", "--generate-only"]
    assert main(argv) == 0
    recs = [json.loads(x) for x in (out / "answers.jsonl").read_text().splitlines()]
    assert sorted(r["mode"] for r in recs) == ["greedy"] * 6 + ["sampled"] * 6
    assert not (out / "heads.json").exists()
    assert "answer tokens cached" in capsys.readouterr().err
