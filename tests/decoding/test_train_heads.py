"""train-heads on a tiny random-weight model: heads learn, checkpoints resume, output loads."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from decoding_helpers import interrupt_after
from mtpserve.decoding.training import hidden_cache
from mtpserve.decoding.config import ModelConfig
from mtpserve.decoding.spec.heads_io import load_heads, save_project_heads
from mtpserve.decoding.training.heads_data import Example
from mtpserve.decoding.model.trunk import CausalLM
from mtpserve.decoding.training.hidden_cache import cache_hidden, targets_for
from mtpserve.decoding.training.train_config import TrainConfig, add_train_args
from mtpserve.decoding.training.train_medusa import train
from mtpserve.decoding.spec.tree_choice import calibrated_tree, expected_accepted
from mtpserve.decoding.training.tree_choice import choose_tree
from mtpserve.decoding.training.vocab import softmax_vocab

CFG = ModelConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, max_position_embeddings=256)
PERIOD = [3, 11, 7, 0, 14, 5, 9]  # distinct tokens: the phase is readable from x_t alone


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = CausalLM(CFG, max_positions=256)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
    model.eval()
    examples = [Example((PERIOD * 12)[s:s + 60], train_from=2) for s in range(12)]
    return model, cache_hidden(model, examples)


def _cfg(**kw) -> TrainConfig:
    base = dict(num_heads=3, epochs=8, lr=5e-2, batch_tokens=128, seed=1, checkpoint_every=0,
                holdout_frac=0.25, targets="tokens", vocab="full", warmup_steps=2)
    base.update(kw)
    return TrainConfig(**base)


def test_targets_are_the_tokens_k_after_the_bonus(tiny):
    _, cache = tiny
    rows, tgts = targets_for(cache, [0], 3, "tokens")
    ids = (PERIOD * 12)[0:60]
    t = int(rows[0])  # first trained position: train_from = 2
    assert t == 2
    assert tgts[0].tolist() == [ids[t + 2], ids[t + 3], ids[t + 4]]
    assert tgts[-1].tolist()[-1] == -1  # past the end of the sequence: no target
    _, amax = targets_for(cache, [0], 1, "argmax")
    assert amax[0, 0] == cache.argmax[t + 1]  # the base's own choice at t+1


def test_heads_learn_a_repeating_sequence_from_chance(tiny, tmp_path):
    model, cache = tiny
    heads, report = train(model, cache, _cfg(), tmp_path)
    before = report["heldout_untrained_identity_heads"]["top1"]
    after = report["heldout"]["top1"]
    assert max(before) < 0.5
    assert min(after) > 0.9, report
    assert len(report["heldout"]["rank_acc"][0]) == 10


def test_checkpoint_resume_continues_from_saved_step(tiny, tmp_path):
    model, cache = tiny
    cfg = _cfg(epochs=4, checkpoint_every=3)
    full, _ = train(model, cache, cfg, tmp_path / "full")
    total = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)["step"]
    assert total > 3
    mid = tmp_path / "mid"
    interrupt_after(3, lambda: train(model, cache, cfg, mid))
    assert torch.load(mid / "checkpoint.pt", weights_only=False)["step"] == 3
    resumed, _ = train(model, cache, cfg, mid, resume=True)
    assert torch.load(mid / "checkpoint.pt", weights_only=False)["step"] == total
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
    with pytest.raises(ValueError, match="other settings"):
        train(model, cache, _cfg(epochs=4, checkpoint_every=3, lr=1e-3), mid, resume=True)



def test_output_loads_and_refuses_another_base(tiny, tmp_path):
    model, cache = tiny
    heads, report = train(model, cache, _cfg(epochs=2), tmp_path)
    best, info = choose_tree(report["heldout"]["rank_acc"], tmp_path)
    heads.default_tree = best
    save_project_heads(heads, tmp_path, CFG, training={"report": report, "tree": info})
    loaded = load_heads(tmp_path, CFG)
    assert loaded.num_heads == 3 and loaded.default_tree == best
    meta = json.loads((tmp_path / "heads.json").read_text())
    assert "heldout" in meta["training"]["report"]
    for a, b in zip(heads.state_dict().values(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b)
    other = ModelConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_layers=3,
                        num_heads=4, num_kv_heads=2)
    with pytest.raises(ValueError, match="belong to base model"):
        load_heads(tmp_path, other)
    wider = ModelConfig(vocab_size=16, hidden_size=64, intermediate_size=64, num_layers=2,
                        num_heads=4, num_kv_heads=2)
    with pytest.raises(ValueError):
        load_heads(tmp_path, wider)


def test_softmax_vocab_adds_the_base_models_plausible_tokens():
    unembed = torch.eye(6)  # hidden e_i scores token i highest
    hidden = torch.eye(6)[[0, 4]] * torch.tensor([[1.0], [2.0]])
    tgts = torch.tensor([[2, -1], [3, 2]])
    cfg = TrainConfig(vocab="plausible", plausible_topk=1)
    assert softmax_vocab(cfg, unembed, hidden, tgts).tolist() == [0, 2, 3, 4]
    cfg = TrainConfig(vocab="targets")
    assert softmax_vocab(cfg, unembed, hidden, tgts).tolist() == [2, 3]


def test_calibrated_tree_follows_accuracies():
    rank_acc = [[0.6, 0.2, 0.1], [0.4, 0.1, 0.05], [0.3, 0.05, 0.01]]
    tree = calibrated_tree(rank_acc, 6)
    # path probabilities: (0,) .6  (0,0) .24  (1,) .2  (2,) .1  (1,0) .08  (0,0,0) .072
    assert tree == [(0,), (1,), (2,), (0, 0), (1, 0), (0, 0, 0)]
    assert all(c[:-1] in tree for c in tree if len(c) > 1)  # every parent path present
    assert expected_accepted([(0,), (0, 0)], rank_acc) == pytest.approx(0.6 + 0.24)


def test_cli_help(capsys):
    p = argparse.ArgumentParser(prog="mtpserve train-heads")
    add_train_args(p)
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--data", "--out", "--num-heads", "--resume", "--holdout-frac",
                 "--generate-max-tokens", "--checkpoint-every", "--batch-tokens", "--seq-len"):
        assert flag in text
    a = p.parse_args(["--data", "x.jsonl", "--out", "o"])
    assert a.num_heads == 4 and a.num_layers == 1


def test_mtpserve_cli_train_heads_help(capsys):
    from mtpserve.server.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train-heads", "--help"])
    assert e.value.code == 0
    assert "--generate-max-tokens" in capsys.readouterr().out


def _tiny_hf_folder(root) -> str:
    """A random-weight Llama folder with a word-level tokenizer and a chat template."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(29)]
    folder = root / "tiny-hf"
    folder.mkdir()
    cfg = {"architectures": ["LlamaForCausalLM"], "vocab_size": len(words), "hidden_size": 32,
           "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "max_position_embeddings": 256, "tie_word_embeddings": True,
           "eos_token_id": 2}
    (folder / "config.json").write_text(json.dumps(cfg))
    model = CausalLM(ModelConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64,
                                 num_layers=2, num_heads=4, num_kv_heads=2), max_positions=64)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, p in model.named_parameters():
        shape = p.shape
        if name.endswith("qkv_proj.weight") or name.endswith("gate_up_proj.weight"):
            continue
        tensors[f"model.{name}"] = (torch.ones(shape) if name.endswith("norm.weight")
                                    else torch.randn(shape, generator=g) * 0.3)
    for i in range(2):
        p = f"model.layers.{i}."
        for n, rows in (("q", 32), ("k", 16), ("v", 16)):
            tensors[p + f"self_attn.{n}_proj.weight"] = torch.randn(rows, 32, generator=g) * 0.3
        for n in ("gate", "up"):
            tensors[p + f"mlp.{n}_proj.weight"] = torch.randn(64, 32, generator=g) * 0.3
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "</s>",
        "chat_template": "{% for m in messages %}{{ m['content'] }} {% endfor %}w0"}))
    return str(folder)


def _word_prompts(root, stop: int):
    """prompts.jsonl of three-word prompts "w3 w4 w5" .. for the tiny folder's vocabulary."""
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"w{i} w{i + 1} w{i + 2}"}) + "\n"
                               for i in range(3, stop)))
    return prompts


def _cli_inputs(tmp_path):
    """train-heads' command-line inputs: a tiny HF model folder, 15 word prompts, a text
    file, and the output folder to use."""
    model = _tiny_hf_folder(tmp_path)
    prompts = _word_prompts(tmp_path, 15)
    text = tmp_path / "notes.txt"
    text.write_text(" ".join(f"w{3 + i % 7}" for i in range(80)))
    return model, prompts, text, tmp_path / "out"


def test_cli_end_to_end_answers_prompts_caches_and_resumes(tmp_path, capsys):
    from mtpserve.server.cli import main

    model, prompts, text, out = _cli_inputs(tmp_path)
    argv = ["train-heads", "--model", model, "--data", str(prompts), str(text), "--out", str(out),
            "--num-heads", "2", "--epochs", "2", "--batch-tokens", "64", "--gen-batch", "4",
            "--generate-max-tokens", "6", "--threads", "1", "--holdout-frac", "0.2"]
    assert main(argv) == 0
    answers = [json.loads(x) for x in (out / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 12 and all(1 <= len(a["completion_ids"]) <= 6 for a in answers)
    meta = json.loads((out / "heads.json").read_text())
    t = meta["training"]
    assert t["data"]["generation"]["answers_generated_now"] == 12
    assert t["data"]["argmax_equals_next_token"] < 1.0  # the text file is not the model's own
    assert len(t["heldout"]["top1"]) == 2 and meta["default_tree"] in ("chain2", "chain4",
                                                                       "tree8", "tree16")
    assert main(argv + ["--resume"]) == 0  # everything cached: nothing regenerated
    t2 = json.loads((out / "heads.json").read_text())["training"]
    assert t2["data"]["generation"]["answers_generated_now"] == 0
    assert "reused" in t2["trunk_pass"]
    assert t2["trunk_pass"]["seconds"] == t["trunk_pass"]["seconds"]  # kept with the cache
    assert "held-out top-1" in capsys.readouterr().err


def test_hidden_cache_reuses_the_sequences_it_has_and_runs_only_new_ones(tiny, tmp_path):
    """Adding a data file after the cached ones runs the trunk on the new sequences only,
    and the result equals a fresh trunk pass over all of them."""
    model, _ = tiny
    old = [Example((PERIOD * 9)[s:s + 40], train_from=1) for s in range(3)]
    new = [Example([1, 2, 3, 4, 5, 6, 7, 8], train_from=0), Example(PERIOD * 2, train_from=3)]
    path = tmp_path / "hidden.pt"
    said: list[str] = []
    hidden_cache.load_or_cache_hidden(model, old, path, said.append)
    calls: list[int] = []
    real = hidden_cache.cache_hidden

    def counting(model_, examples, **kw):
        calls.append(len(examples))
        return real(model_, examples, **kw)

    hidden_cache.cache_hidden = counting
    try:
        got, info = hidden_cache.load_or_cache_hidden(model, old + new, path, said.append)
        again, info2 = hidden_cache.load_or_cache_hidden(model, old + new, path, said.append)
        changed, _ = hidden_cache.load_or_cache_hidden(model, new + old, path, said.append)
    finally:
        hidden_cache.cache_hidden = real
    assert calls == [2, 5]  # the new two; nothing on the rerun; all five once the order changed
    assert info["reused_sequences"] == 3 and info2["reused"] == str(path)
    # this run's rate counts only what it computed: the two new sequences' positions
    assert info["positions_this_run"] == len(new[0].ids) + len(new[1].ids)
    assert 0 <= info["seconds_this_run"] <= info["seconds"]
    fresh = cache_hidden(model, old + new)
    for field in ("hidden", "argmax", "tokens", "seq_start", "train_from"):
        torch.testing.assert_close(getattr(got, field), getattr(fresh, field), msg=field)
        torch.testing.assert_close(getattr(again, field), getattr(fresh, field), msg=field)
    assert changed.seq_start[1] == len(new[0].ids)
    assert any("reusing 3 of 5" in m for m in said)


def test_an_interrupted_trunk_pass_resumes_from_its_last_save(tiny, tmp_path, monkeypatch):
    """The pass saves what it has every CHECKPOINT_S seconds (0 here: after every
    sequence); interrupted after the second save, a rerun runs the trunk on the rest only
    and ends with the same cache as one uninterrupted pass. A cache of another trunk
    weight format is not reused."""
    model, _ = tiny
    examples = [Example((PERIOD * 9)[s:s + 30 + s], train_from=2) for s in range(5)]
    path = tmp_path / "hidden.pt"
    monkeypatch.setattr(hidden_cache, "CHECKPOINT_S", 0.0)

    def interrupt(msg: str) -> None:
        if "saved 2 of 5" in msg:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        hidden_cache.load_or_cache_hidden(model, examples, path, interrupt)
    assert torch.load(path, weights_only=False)["key"] is None  # partial: never reused whole
    calls: list[int] = []
    real = hidden_cache.cache_hidden

    def counting(model_, examples_, **kw):
        calls.append(len(examples_))
        return real(model_, examples_, **kw)

    monkeypatch.setattr(hidden_cache, "cache_hidden", counting)
    said: list[str] = []
    got, info = hidden_cache.load_or_cache_hidden(model, examples, path, said.append)
    assert calls == [3] and info["reused_sequences"] == 2
    fresh = real(model, examples)
    for field in ("hidden", "argmax", "tokens", "seq_start", "train_from"):
        torch.testing.assert_close(getattr(got, field), getattr(fresh, field), msg=field)
    assert (fresh.argmax[:2] == -1).all() and (fresh.argmax[2:30] >= 0).all()
    _, again = hidden_cache.load_or_cache_hidden(model, examples, path, said.append)
    assert again["reused"] == str(path)
    _, other = hidden_cache.load_or_cache_hidden(model, examples, path, said.append,
                                                 trunk="int4")
    assert calls == [3, 5] and "reused" not in other and other["weights"] == "int4"
