"""train-heads --head-type sequential on a tiny random-weight model: the module learns,
training runs what drafting runs, the project format round-trips, greedy output is kept."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from decoding_helpers import greedy, run_requests
from mtpserve.decoding.config import EngineConfig, ModelConfig, SpecConfig
from mtpserve.decoding.engine.llm_engine import LLMEngine
from mtpserve.decoding.spec.heads_io import load_heads, save_project_heads
from mtpserve.decoding.training.heads_data import Example
from mtpserve.decoding.model.trunk import CausalLM
from mtpserve.decoding.spec.mtp_sequential import SequentialMTPHeads
from mtpserve.decoding.training.hidden_cache import cache_hidden, targets_for
from mtpserve.decoding.training.progress import ProgressBar
from mtpserve.decoding.training.train_config import TrainConfig
from mtpserve.decoding.spec.tree_choice import calibrated_tree, on_chain
from mtpserve.decoding.training.tree_choice import choose_tree
from mtpserve.decoding.spec.mtp_context import ModuleContext, NewEntries, write_and_draft
from mtpserve.decoding.training.train_sequential import (chain_inputs, chain_logits, context_logits,
                                                row_positions, train_sequential)

CFG = ModelConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, max_position_embeddings=256)
# The token after x depends on the token before it (3 follows 11 after 7 but 5 after 9):
# a Medusa head at t+2 must guess, a module that sees x_{t+1} and h_t need not.
PERIOD = [7, 11, 3, 0, 9, 11, 5, 14, 2]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = CausalLM(CFG, max_positions=256)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.3) if not name.endswith("norm.weight") else p.fill_(1.0)
    model.eval()
    examples = [Example((PERIOD * 12)[s:s + 60], train_from=2) for s in range(12)]
    return model, cache_hidden(model, examples)


def _cfg(**kw) -> TrainConfig:
    base = dict(head_type="sequential", num_heads=3, epochs=10, lr=2e-2, batch_tokens=128,
                seed=1, checkpoint_every=0, holdout_frac=0.25, targets="tokens", vocab="full",
                warmup_steps=2)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    model, cache = tiny
    out = tmp_path_factory.mktemp("seq")
    heads, report = train_sequential(model, cache, _cfg(attention="context"), out, draft_vocab=12)
    return heads, report, out


@pytest.fixture(scope="module")
def trained_chain(tiny, tmp_path_factory):
    """Heads trained the session-4 way: attending over the draft chain only."""
    model, cache = tiny
    out = tmp_path_factory.mktemp("seq_chain")
    heads, report = train_sequential(model, cache, _cfg(), out, draft_vocab=12)
    assert not heads.context  # the default
    return heads, report, out


def test_module_learns_every_depth_from_its_identity_start(trained):
    _, report, _ = trained
    before = report["heldout_untrained_identity_heads"]["top1"]
    after = report["heldout"]["top1"]
    assert max(before) < 0.6, report
    assert min(after) > 0.95, report
    assert report["heldout"]["chain_accepted"][-1] > 2.8  # 3 of 3 drafts nearly always
    assert report["draft_vocab"]["size"] <= 12


def test_chain_mode_learns_too(trained_chain):
    assert min(trained_chain[1]["heldout"]["top1"]) > 0.9, trained_chain[1]


def test_training_chain_equals_drafting(tiny, trained_chain):
    """Chain mode: feeding the drafted top-1 tokens back as the chain's inputs,
    train_sequential's list-backed forward gives the drafting path's top-k at every depth."""
    model, cache = tiny
    heads, _, _ = trained_chain
    rows = torch.tensor([5, 17, 30, 44])
    pos = row_positions(cache)[rows]
    bonus = cache.argmax[rows].tolist()
    with torch.no_grad():
        drafted = heads.candidates(cache.hidden[rows], model, bonus, 3, positions=pos.tolist())
        chain = torch.tensor([[bonus[i]] + [d[0] for d in drafted[i][:2]] for i in range(4)])
        unembed = model.unembed_weight().detach().float()[heads.draft_vocab]
        lg = chain_logits(heads, model, cache.hidden[rows], chain, pos, unembed)
    top = heads.draft_vocab[lg.topk(heads.topk, -1).indices]
    assert top.tolist() == drafted


def test_context_training_forward_equals_drafting(tiny, trained):
    """Context mode: training's whole-sequence forward (causal over depth-1 entries, the
    chain's own deeper depths on the diagonal) gives, at every position, the top-k that
    the engine's drafting (mtp_context.write_and_draft, entries written one step at a
    time) gives there; deeper depths wherever the drafted chain matches the teacher-forced
    one. Two sequences padded into one batch give the same logits as either alone."""
    model, cache = tiny
    heads, _, _ = trained
    assert heads.context
    s, D = 1, 3
    a, b = int(cache.seq_start[s]), int(cache.seq_start[s + 1])
    unembed = model.unembed_weight().detach().float()[heads.draft_vocab]
    with torch.no_grad():
        rows, lg = context_logits(heads, model, cache, [s], D, "tokens", unembed)
        rows2, lg2 = context_logits(heads, model, cache, [3, s], D, "tokens", unembed)
    assert rows.tolist() == list(range(a, b))
    torch.testing.assert_close(lg2[(rows2 >= a) & (rows2 < b)], lg, rtol=1e-5, atol=1e-5)
    train_top = heads.draft_vocab[lg.topk(heads.topk, -1).indices]  # [n, D, k]
    inputs = chain_inputs(cache, rows, D, "tokens")
    ctx = ModuleContext(CFG, 1, 1, 128, torch.float32, torch.device("cpu"))
    deep = 0
    with torch.inference_mode():
        for p in range(b - a - 1):
            got = write_and_draft(heads, cache.hidden, model,
                                  [NewEntries(0, p, [a + p], [int(cache.tokens[a + p])],
                                              drafts=True)], ctx, D)[0]
            assert got[0] == train_top[p, 0].tolist(), p
            for j in range(1, D):
                if got[j - 1][0] != int(inputs[p, j]):
                    break
                assert got[j] == train_top[p, j].tolist(), (p, j)
                deep += 1
    assert deep > (b - a)  # most positions checked at depths 2 and 3 too


def test_inputs_are_the_tokens_the_chain_reads(tiny):
    _, cache = tiny
    rows, tgts = targets_for(cache, [0], 3, "tokens")
    inp = chain_inputs(cache, rows, 3, "tokens")
    ids = (PERIOD * 12)[0:60]
    t = int(rows[0])
    assert inp[0].tolist() == [ids[t + 1], ids[t + 2], ids[t + 3]]  # x_{t+1}, x_{t+2}, x_{t+3}
    assert tgts[0].tolist() == [ids[t + 2], ids[t + 3], ids[t + 4]]  # one further each
    assert row_positions(cache)[int(cache.seq_start[1]) + 4] == 4


def test_project_format_round_trips_and_refuses_another_base(trained, tmp_path):
    heads, report, _ = trained
    heads.default_tree = "chain4"
    save_project_heads(heads, tmp_path, CFG, training={"report": report})
    meta = json.loads((tmp_path / "heads.json").read_text())
    assert meta["head_type"] == "sequential" and meta["num_modules"] == 1
    assert meta["draft_vocab_size"] == heads.draft_vocab.numel()
    loaded = load_heads(tmp_path, CFG)
    assert isinstance(loaded, SequentialMTPHeads) and loaded.default_tree == "chain4"
    assert torch.equal(loaded.draft_vocab, heads.draft_vocab)
    for (k, a), b in zip(heads.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
    other = ModelConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_layers=3,
                        num_heads=4, num_kv_heads=2)
    with pytest.raises(ValueError, match="belong to base model"):
        load_heads(tmp_path, other)
    meta["num_modules"] = 2  # the weights hold one module
    (tmp_path / "heads.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="heads do not fit"):
        load_heads(tmp_path, CFG)
    del meta["num_modules"]
    (tmp_path / "heads.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="num_modules"):
        load_heads(tmp_path, CFG)


def test_resume_continues_to_the_same_weights(tiny, tmp_path):
    model, cache = tiny
    cfg = _cfg(epochs=2, checkpoint_every=2)
    full, _ = train_sequential(model, cache, cfg, tmp_path / "full")

    class Stop(Exception):
        pass

    orig = ProgressBar.update

    def update(self, step, text):
        if step > 2:
            raise Stop  # killed right after the step-2 checkpoint
        orig(self, step, text)

    ProgressBar.update = update
    try:
        with pytest.raises(Stop):
            train_sequential(model, cache, cfg, tmp_path / "mid")
    finally:
        ProgressBar.update = orig
    resumed, _ = train_sequential(model, cache, cfg, tmp_path / "mid", resume=True)
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
    with pytest.raises(ValueError, match="other settings"):
        train_sequential(model, cache, _cfg(epochs=2, lr=1e-3), tmp_path / "mid", resume=True)


def test_trees_for_sequential_heads_branch_off_the_chain(tmp_path):
    rank_acc = [[0.5, 0.3, 0.1], [0.6, 0.3, 0.05], [0.7, 0.2, 0.01]]
    free = calibrated_tree(rank_acc, 8)
    assert not on_chain(free)  # (1, 0) is worth a node when heads are independent
    chained = calibrated_tree(rank_acc, 8, chain_only=True)
    assert on_chain(chained) and len(chained) == 8
    best, info = choose_tree(rank_acc, tmp_path, chain_only=True)
    assert set(info["expected_accepted_drafts"]) == {"chain2", "chain4"}
    _, info = choose_tree(rank_acc, tmp_path, topk=2)
    assert all(r < 2 for c in info["calibrated16"]["choices"] for r in c)


def test_trained_heads_keep_greedy_output_and_get_accepted(tiny, trained):
    model, cache = tiny
    heads, _, _ = trained
    m64 = copy.deepcopy(model).double()
    m64.rope.float()
    h64 = copy.deepcopy(heads).double().eval()

    class Tok:
        vocab_size = 16
        eos_token_ids: tuple[int, ...] = ()

        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(65 + i) for i in ids)

    def engine(spec: str) -> LLMEngine:
        cfg = EngineConfig(dtype="float64", device="cpu", max_num_seqs=4, max_model_len=128,
                           spec=SpecConfig(mode=spec, proposer="heads", tree="chain4"))
        return LLMEngine(cfg, m64, Tok(), "tiny", heads=h64 if spec == "on" else None)

    prompts = [PERIOD[:5], PERIOD[3:9] + PERIOD[:2], [1, 2, 3], [4]]
    plain = run_requests(engine("off"), [(p, greedy(24, ignore_eos=True)) for p in prompts])
    spec = run_requests(engine("on"), [(p, greedy(24, ignore_eos=True)) for p in prompts])
    assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
    drafted = sum(r.last.spec.num_draft_tokens for r in spec)
    accepted = sum(r.last.spec.num_accepted_draft_tokens for r in spec)
    assert drafted > 0 and accepted > 0


def test_cli_trains_sequential_heads_that_load_and_report(tmp_path, capsys):
    from test_train_heads import _tiny_hf_folder, _word_prompts

    from mtpserve.server.cli import main

    model = _tiny_hf_folder(tmp_path)
    prompts = _word_prompts(tmp_path, 15)
    out = tmp_path / "out"
    argv = ["train-heads", "--head-type", "sequential", "--model", model, "--data", str(prompts),
            "--out", str(out), "--num-heads", "2", "--epochs", "2", "--batch-tokens", "32",
            "--gen-batch", "4", "--generate-max-tokens", "6", "--threads", "1",
            "--holdout-frac", "0.2", "--draft-vocab", "8"]
    assert main(argv) == 0
    meta = json.loads((out / "heads.json").read_text())
    assert meta["head_type"] == "sequential" and meta["training"]["method"].startswith("sequential")
    choices = meta["training"]["tree"]["calibrated16"]["choices"]
    assert on_chain([tuple(c) for c in choices]) and max(r for c in choices for r in c) < 4
    err = capsys.readouterr().err
    assert "held-out top-1" in err and "draft vocab" in err
    from mtpserve.decoding.model.checkpoint import load_checkpoint

    assert isinstance(load_heads(out, load_checkpoint(model).config), SequentialMTPHeads)
    with pytest.raises(ValueError, match="sequential heads build their draft vocabulary"):
        main(argv + ["--draft-vocab-only"])
    # chain (the default) first, then context from its weights
    assert meta["attention"] == "chain" and "chain attention" in meta["training"]["method"]
    ctx_out = tmp_path / "ctx"
    argv_ctx = argv[:argv.index("--out") + 1] + [str(ctx_out)] + argv[argv.index("--out") + 2:]
    assert main(argv_ctx + ["--module-attention", "context", "--init-heads", str(out)]) == 0
    ctx_meta = json.loads((ctx_out / "heads.json").read_text())
    assert ctx_meta["attention"] == "context"
    warm = ctx_meta["training"]
    assert warm["data"]["init_heads"] == str(out)
    assert isinstance(load_heads(ctx_out, load_checkpoint(model).config), SequentialMTPHeads)
    # the starting point reported is the given heads, not the identity start
    assert "heldout_untrained_identity_heads" not in warm and "heldout_init_heads" in warm


def test_init_starts_from_the_given_heads(tiny, trained_chain, tmp_path):
    """`init` (train-heads --init-heads): training starts from those weights; with a
    vanishing learning rate it ends there, in the attention mode asked for."""
    model, cache = tiny
    start, _, _ = trained_chain
    cfg = _cfg(attention="context", epochs=1, lr=1e-12)
    heads, report = train_sequential(model, cache, cfg, tmp_path, init=start)
    assert heads.context and not start.context
    for (k, a), b in zip(start.state_dict().items(), heads.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k, rtol=0, atol=1e-6)
    assert "heldout_init_heads" in report


def test_over_an_int4_trunk_drafting_is_int4_and_stays_in_the_draft_vocab(tiny, trained):
    model, cache = tiny
    heads, _, _ = trained
    m4 = copy.deepcopy(model)
    m4.quantize("int4")
    h4 = copy.deepcopy(heads)
    h4.prepare(m4)
    h4.prepare(m4)  # idempotent: quantizes once
    assert h4.mods[0].block.mlp.down_proj.weight_format == "int4"
    assert h4._int4_rows is not None and h4._rows.rows is None  # no dense copy kept
    assert heads.mods[0].block.mlp.down_proj.weight_format == "dense"  # over a dense trunk
    rows = torch.tensor([5, 17, 30])
    bonus = cache.argmax[rows].tolist()
    with torch.no_grad():
        dense = heads.candidates(cache.hidden[rows], model, bonus, 3)
        quant = h4.candidates(cache.hidden[rows], m4, bonus, 3)
    allowed = set(heads.draft_vocab.tolist())
    assert all(t in allowed for seq in quant for depth in seq for t in depth)
    # bf16 kernel rounding may reorder near-ties, not the clear top-1 of a learned pattern
    assert [[d[0] for d in s] for s in quant] == [[d[0] for d in s] for s in dense]


def test_shipped_heads_default_and_by_type(tmp_path, monkeypatch):
    from mtpserve.decoding.spec import heads_io as heads_mod

    monkeypatch.setattr(heads_mod, "SHIPPED_HEADS_DIR", tmp_path)
    assert heads_mod.shipped_heads("abc") is None
    for name, kind in (("abc", "sequential"), ("abc-medusa", "medusa"), ("abd", "medusa")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "heads.json").write_text(json.dumps({"head_type": kind}))
    assert heads_mod.shipped_heads("abc") == tmp_path / "abc"  # the default, whatever its type
    assert heads_mod.shipped_heads("abc", "sequential") == tmp_path / "abc"
    assert heads_mod.shipped_heads("abc", "medusa") == tmp_path / "abc-medusa"
    assert heads_mod.shipped_heads("abd", "sequential") is None


# -- training-time test, KL targets and chain inputs (#24) ------------------------------
def _depth_inputs(model, cache, cfg, tmp_path, monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Run one training step of `cfg` and record, per depth of its first batch, the hidden
    input MTPModule.advance read and the state it returned."""
    from mtpserve.decoding.spec.mtp_sequential import MTPModule

    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    real = MTPModule.advance

    def spy(self, tokens, h_prev, model_, meta, kv):
        h, normed = real(self, tokens, h_prev, model_, meta, kv)
        if len(seen) < cfg.num_heads:
            seen.append((h_prev.detach().clone(), h.detach().clone()))
        return h, normed

    monkeypatch.setattr(MTPModule, "advance", spy)
    monkeypatch.setattr("mtpserve.decoding.training.train_sequential.evaluate_chain",
                        lambda *a, **k: {"top1": [0.0], "top5": [0.0]})
    train_sequential(model, cache, cfg, tmp_path, draft_vocab=0)
    return seen


def _is_trunk_row(h: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Per row of h: does it equal some cached trunk hidden state?"""
    d = torch.cdist(h.float(), hidden.float(), compute_mode="donot_use_mm_for_euclid_dist")
    return d.min(1).values < 1e-5


def test_depth_2_trains_on_the_modules_own_state_not_the_trunks(tiny, tmp_path, monkeypatch):
    """Training-time test: depth 2 reads what depth 1 produced (as drafting does); the
    --chain-features trunk ablation feeds the trunk's h_{t+1} instead."""
    model, cache = tiny
    cfg = _cfg(epochs=1, batch_tokens=64, holdout_frac=0.0)
    own = _depth_inputs(model, cache, cfg, tmp_path / "own", monkeypatch)
    assert _is_trunk_row(own[0][0], cache.hidden).all()  # depth 1: the trunk's h_t
    for j in (1, 2):
        torch.testing.assert_close(own[j][0], own[j - 1][1])  # depth j+1 reads depth j's state
        assert not _is_trunk_row(own[j][0], cache.hidden).any()
    cfg_t = _cfg(epochs=1, batch_tokens=64, holdout_frac=0.0, chain_features="trunk")
    trunk = _depth_inputs(model, cache, cfg_t, tmp_path / "trunk", monkeypatch)
    for j in (1, 2):
        assert _is_trunk_row(trunk[j][0], cache.hidden).all()
        assert not torch.allclose(trunk[j][0], trunk[j - 1][1])


def test_teacher_is_the_trunks_softmax_at_the_target_position(tiny):
    from mtpserve.decoding.training.train_sequential import teacher_probs

    model, cache = tiny
    rows, tgts = targets_for(cache, [0, 1], 3, "argmax")
    p = teacher_probs(cache, rows, 3, model.unembed_weight().detach().float())
    assert torch.allclose(p.sum(-1), torch.ones(p.shape[:2]))
    ok = tgts >= 0
    assert (p.argmax(-1)[ok] == tgts[ok]).all()  # the argmax targets are its modes


def test_kl_distillation_lowers_its_loss_and_saves_the_same_format(tiny, tmp_path, monkeypatch):
    model, cache = tiny
    losses: list[float] = []
    real = ProgressBar.update

    def update(self, step, text):
        losses.append(float(text.split("loss ")[1].split()[0]))
        real(self, step, text)

    monkeypatch.setattr(ProgressBar, "update", update)
    cfg = _cfg(distill="kl", targets="argmax", chain_inputs="data", epochs=4, vocab="plausible")
    heads, report = train_sequential(model, cache, cfg, tmp_path, draft_vocab=12)
    assert len(losses) >= 8 and losses[-1] < 0.7 * losses[0], losses
    assert report["heldout"]["top1"][0] > report["heldout_untrained_identity_heads"]["top1"][0]
    save_project_heads(heads, tmp_path, CFG, training={"config": {"distill": "kl"}})
    again = load_heads(tmp_path, CFG)
    assert isinstance(again, SequentialMTPHeads) and not again.context
    h = cache.hidden[:4]
    with torch.no_grad():
        assert again.candidates(h, model, [1, 2, 3, 4], 3) == heads.candidates(h, model, [1, 2, 3, 4], 3)


def test_chain_inputs_data_feeds_the_datas_tokens(tiny):
    _, cache = tiny
    rows = torch.tensor([3, 10, 25])
    assert torch.equal(chain_inputs(cache, rows, 3, "tokens"),
                       cache.tokens[rows[:, None] + torch.arange(3)].clamp(min=0))
    with pytest.raises(ValueError, match="sequential"):
        TrainConfig(distill="kl")  # medusa
    with pytest.raises(ValueError, match="chain"):
        _cfg(attention="context", chain_features="trunk")
