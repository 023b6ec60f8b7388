"""train-heads --joint on tiny random-weight models: the forward curriculum, which weights
move, the loss falls, OUT/model reloads with the same logits and greedy speculation stays
exact with the jointly trained heads, checkpoints resume, and the command line end to end."""

from __future__ import annotations

import json

import pytest
import torch

from decoding_helpers import greedy, interrupt_after, prefill_logits, run_requests
from mtpserve.decoding.config import EngineConfig, ModelConfig, SpecConfig
from mtpserve.decoding.engine.llm_engine import LLMEngine
from mtpserve.decoding.spec.heads import MedusaHeads
from mtpserve.decoding.spec.heads_io import save_project_heads
from mtpserve.decoding.training.heads_data import Example
from mtpserve.decoding.model.trunk import CausalLM
from mtpserve.decoding.model.trunk_weights import load_trunk_weights
from mtpserve.decoding.training.train_config import TrainConfig
from mtpserve.decoding.training.tree_choice import choose_tree
from mtpserve.decoding.training.joint_trunk import export_trunk, hf_tensors, load_trainable, trunk_hidden
from mtpserve.decoding.training.train_joint import JointConfig, curriculum_weights, joint_loss, train_joint
from test_train_heads import _cli_inputs, _tiny_hf_folder

CFG = ModelConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, max_position_embeddings=256)
PERIOD = [3, 11, 7, 0, 14, 5, 9]  # distinct tokens: the phase is readable from x_t alone


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads; on a busy 2-core machine two contended
    threads made this file ~8x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny_model() -> CausalLM:
    torch.manual_seed(0)
    model = CausalLM(CFG, max_positions=256)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.3)
    return model.eval()


def _examples(period=PERIOD, n=12, length=60) -> list[Example]:
    return [Example((period * 20)[s:s + length], train_from=2) for s in range(n)]


def _cfg(**kw) -> TrainConfig:
    base = dict(num_heads=3, epochs=8, lr=5e-2, batch_tokens=128, seed=1, checkpoint_every=0,
                holdout_frac=0.25, targets="tokens", vocab="full", warmup_steps=2)
    return TrainConfig(**(base | kw))


def _jcfg(**kw) -> JointConfig:
    return JointConfig(**(dict(trunk_lr=1e-2, trunk_layers=1) | kw))


# -- the curriculum ----------------------------------------------------------------------------
def test_forward_curriculum_phases_the_heads_in_one_after_another():
    K, total = 4, 100
    ws = [curriculum_weights(s, total, K, 0.5) for s in range(total)]
    assert ws[0] == [0.0] * K  # next-token prediction only
    on = [next(s for s, w in enumerate(ws) if w[k] > 0) for k in range(K)]
    assert on == sorted(set(on)) and on[0] > 0  # head k strictly before head k+1
    for k in range(K):  # once on, a head stays on
        assert all(w[k] == 1.0 for w in ws[on[k]:])
        assert all(w[k] == 0.0 for w in ws[:on[k]])
    assert on[-1] == 50 and all(w == [1.0] * K for w in ws[50:])  # all on at the ramp's end
    # ramp K/(K+1): the paper's equal stages (one more token every n/(K+1) steps)
    paper = [curriculum_weights(s, 120, 3, 3 / 4) for s in range(120)]
    assert [next(s for s, w in enumerate(paper) if w[k]) for k in range(3)] == [30, 60, 90]


def test_no_curriculum_switches_every_head_on_from_the_start():
    assert curriculum_weights(0, 100, 3, 0.0) == [1.0, 1.0, 1.0]
    assert JointConfig(curriculum="none").weights(0, 100, 3) == [1.0, 1.0, 1.0]
    assert JointConfig().weights(0, 100, 3) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        JointConfig(curriculum="reverse")
    with pytest.raises(ValueError):
        JointConfig(ramp_frac=1.5)


# -- joint steps ---------------------------------------------------------------------------------
def test_joint_steps_move_only_the_trained_layers_and_the_loss_falls(tmp_path):
    model = _tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    examples = _examples()
    cfg = _cfg()
    batch = examples[:3]
    with torch.no_grad():
        start, parts0 = joint_loss(model, MedusaHeads(32, 16, 3, 1), batch, [1.0] * 3, cfg)
    heads, report = train_joint(model, examples, cfg, _jcfg(), tmp_path)
    for n, p in model.named_parameters():
        if n.startswith("layers.1.") or n == "norm.weight":  # the last layer + final norm
            assert not torch.equal(p, before[n]), n
        else:  # layer 0 and the embedding (tied unembedding): bit-identical
            assert torch.equal(p, before[n]), n
    assert not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        end, parts = joint_loss(model, heads, batch, [1.0] * 3, cfg)
    assert end < 0.25 * start and parts["ntp"] < 0.25 * parts0["ntp"], (parts0, parts)
    assert report["final_train_loss_ema"]["loss"] < float(start)
    # The heads learned the period under the fine-tuned trunk (held out), from chance.
    assert min(report["heldout"]["top1"]) > 0.9, report["heldout"]
    assert max(report["heldout_untrained_identity_heads_original_trunk"]["top1"]) < 0.5
    drift = report["trunk_drift"]
    assert drift["fine_tuned_top1_vs_data"] > 0.9 > drift["original_top1_vs_data"]
    assert drift["next_token_agreement_with_original"] < 0.9  # the trunk did move
    assert report["curriculum_switch_on_steps"] == sorted(report["curriculum_switch_on_steps"])


def test_trunk_hidden_of_a_padded_batch_equals_one_sequence_at_a_time():
    model = _tiny_model()
    seqs = [PERIOD * 3, PERIOD[:4], [1, 2, 3, 4, 5, 6, 7, 8, 9]]
    with torch.no_grad():
        together = trunk_hidden(model, seqs)
        alone = torch.cat([trunk_hidden(model, [s]) for s in seqs])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_hf_tensors_load_back_into_the_same_model():
    model = _tiny_model()
    again = CausalLM(CFG, max_positions=256)
    load_trunk_weights(again, hf_tensors(model))
    for (n, a), b in zip(model.named_parameters(), again.parameters()):
        assert torch.equal(a, b), n


# -- OUT/model and the heads, served -----------------------------------------------------------
def _word_examples() -> list[Example]:
    period = [5, 17, 9, 23, 12, 30, 8, 26, 14]  # words of the tiny folder's vocabulary
    return [Example((period * 12)[s:s + 50], train_from=1) for s in range(14)]


def test_exported_trunk_serves_the_fine_tuned_logits_and_greedy_speculation_stays_exact(tmp_path):
    folder = _tiny_hf_folder(tmp_path)
    model, ck = load_trainable(folder, torch.device("cpu"))
    out = tmp_path / "joint"
    heads, report = train_joint(model, _word_examples(), _cfg(epochs=6), _jcfg(), out)
    heads.default_tree, _ = choose_tree(report["heldout"]["rank_acc"], out, topk=heads.topk)
    export_trunk(model, ck, out / "model")
    save_project_heads(heads, out, model.config, training={"joint": True})

    spec = SpecConfig(mode="on", heads_path=str(out), proposer="heads")
    fp32 = LLMEngine.from_config(EngineConfig(model=str(out / "model"), dtype="float32",
                                              device="cpu", spec=spec))
    assert isinstance(fp32.heads, MedusaHeads)
    ids = [5, 17, 9, 23, 12, 30, 8, 26, 14, 5, 17, 3, 4]
    with torch.no_grad():
        mine = model.compute_logits(trunk_hidden(model, [ids]))
    # fp32: the engine's transposed CPU weights sum in another order (~1e-6 relative).
    torch.testing.assert_close(prefill_logits(fp32.model, ids), mine, atol=1e-5, rtol=1e-5)

    # Invariant 2 in float64, where it is exact: the jointly trained heads draft, and the
    # tokens are plain greedy's.
    prompts = [[5, 17, 9], [23, 12, 30, 8], [3, 4, 6]]
    runs = {}
    for mode in ("off", "on"):
        eng = LLMEngine.from_config(EngineConfig(
            model=str(out / "model"), dtype="float64", device="cpu",
            spec=SpecConfig(mode=mode, heads_path=str(out), proposer="heads")))
        runs[mode] = run_requests(eng, [(p, greedy(20, ignore_eos=True)) for p in prompts])
    assert [r.token_ids for r in runs["on"]] == [r.token_ids for r in runs["off"]]
    accepted = sum(r.last.spec.num_accepted_draft_tokens for r in runs["on"])
    assert accepted > 10  # the heads were used, and right


# -- checkpoints -------------------------------------------------------------------------------
def test_checkpoint_resume_continues_from_the_saved_step_with_the_trunk(tmp_path):
    cfg, jcfg = _cfg(epochs=3, checkpoint_every=3), _jcfg()
    full_model = _tiny_model()
    full, _ = train_joint(full_model, _examples(), cfg, jcfg, tmp_path / "full")
    total = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)["step"]
    assert total > 3
    mid = tmp_path / "mid"
    interrupt_after(3, lambda: train_joint(_tiny_model(), _examples(), cfg, jcfg, mid))
    saved = torch.load(mid / "checkpoint.pt", weights_only=False)
    assert saved["step"] == 3
    assert {"norm.weight", "layers.1.mlp.down_proj.weight"} <= set(saved["trunk"])
    assert "layers.0.mlp.down_proj.weight" not in saved["trunk"]
    resumed_model = _tiny_model()
    resumed, _ = train_joint(resumed_model, _examples(), cfg, jcfg, mid, resume=True)
    assert torch.load(mid / "checkpoint.pt", weights_only=False)["step"] == total
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
    for (k, a), b in zip(full_model.named_parameters(), resumed_model.parameters()):
        torch.testing.assert_close(a, b, msg=k)
    with pytest.raises(ValueError, match="other settings"):
        train_joint(_tiny_model(), _examples(), cfg, _jcfg(trunk_lr=1e-3), mid, resume=True)



# -- the command line ----------------------------------------------------------------------------
def test_cli_joint_end_to_end_writes_a_servable_model_and_its_heads(tmp_path, capsys):
    from mtpserve.server.cli import main

    model, prompts, text, out = _cli_inputs(tmp_path)
    argv = ["train-heads", "--joint", "--model", model, "--data", str(prompts), str(text),
            "--out", str(out), "--num-heads", "2", "--epochs", "2", "--batch-tokens", "64",
            "--gen-batch", "4", "--generate-max-tokens", "6", "--threads", "1",
            "--holdout-frac", "0.2", "--trunk-layers", "1", "--trunk-lr", "1e-3",
            "--max-steps", "4", "--curriculum-ramp", "0.5"]
    assert main(argv) == 0
    names = {p.name for p in (out / "model").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    t = json.loads((out / "heads.json").read_text())["training"]
    assert t["joint"] is True and t["curriculum"] == {"kind": "forward", "ramp_frac": 0.5}
    assert (t["trunk_lr"], t["trunk_layers"], t["steps"]) == (1e-3, 1, 4)
    assert t["fine_tuned_model"] == str(out / "model") and "belong to" in t["note"]
    assert len(t["heldout"]["top1"]) == 2 and 0 <= t["trunk_drift"][
        "next_token_agreement_with_original"] <= 1
    err = capsys.readouterr().err
    assert "trunk moved" in err and "belong to the fine-tuned trunk" in err
    # What the final message tells users to run loads the model and its heads.
    assert main(["generate", "--model", str(out / "model"), "--heads", str(out), "--speculate",
                 "on", "--proposer", "heads", "--max-tokens", "4", "--device", "cpu",
                 "w3 w4 w5"]) == 0
    assert main(argv + ["--resume"]) == 0  # the checkpoint is at its last step: nothing to do
    assert "resumed from" in capsys.readouterr().err


@pytest.mark.parametrize("extra, match", [
    (["--joint", "--head-type", "sequential"], "--head-type sequential is not supported"),
    (["--joint", "--hidden-cache", "h.pt"], "--hidden-cache does not go with --joint"),
    (["--max-steps", "3"], "--max-steps is for --joint"),
])
def test_cli_refuses_what_joint_training_does_not_do(tmp_path, extra, match):
    from mtpserve.server.cli import main

    argv = ["train-heads", "--model", str(tmp_path / "not-loaded"), "--data", "x.jsonl",
            "--out", str(tmp_path / "out")]
    with pytest.raises(ValueError, match=match):
        main(argv + extra)
