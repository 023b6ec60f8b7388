"""Draft vocabulary (FR-Spec style) for Medusa heads, on tiny random models.

- candidates over a draft vocabulary equal the full-vocabulary candidates whenever the
  full top-k lies inside it, and always lie inside it (shared and own unembedding);
- the sliced unembedding is built once and follows `.to(dtype)`;
- heads.safetensors/heads.json round trip, old folders (no draft_vocab) keep the full
  vocabulary, bad draft vocabularies are refused naming the file;
- building it from data (top-N answer tokens plus head targets), `train(draft_vocab=N)`
  and `train-heads --draft-vocab-only` on an existing folder.
"""

from __future__ import annotations

import json

import pytest
import torch

from decoding_helpers import random_causal_lm, randomize_, tiny_config
from mtpserve.decoding.spec.heads import MedusaHeads
from mtpserve.decoding.spec.heads_io import add_draft_vocab, load_heads, save_project_heads
from mtpserve.decoding.training.heads_data import Example
from mtpserve.decoding.training.hidden_cache import cache_hidden, targets_for
from mtpserve.decoding.training.train_config import TrainConfig
from mtpserve.decoding.training.train_medusa import evaluate, train
from mtpserve.decoding.training.vocab import build_draft_vocab

V, H, NH, K = 256, 32, 3, 4


@pytest.fixture(scope="module")
def model():
    return random_causal_lm(tiny_config(vocab=V, hidden=H), torch.float64, seed=3)


def _heads(own: bool = False, seed: int = 1) -> MedusaHeads:
    return randomize_(MedusaHeads(H, V, NH, 1, own_unembedding=own), seed=seed).double().eval()


def _hidden(n: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, H, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("own", [False, True], ids=["shared-unembedding", "own-unembedding"])
def test_candidates_match_full_vocab_when_its_topk_is_inside(model, own):
    heads = _heads(own)
    hidden = _hidden()
    full = torch.tensor(heads.candidates(hidden, model, [0] * len(hidden)))  # [B, nh, k]
    # Half the rows keep their full top-k inside the draft vocab; the rest lose their
    # best token (and their top-k is then not inside).
    keep = torch.zeros(V, dtype=torch.bool)
    keep[torch.arange(0, V, 3)] = True
    keep[full[::2].flatten()] = True
    keep[full[1::2, :, 0].flatten()] = False
    ids = keep.nonzero().flatten()
    heads.set_draft_vocab(ids)
    assert heads.head_logits(hidden, model).shape == (NH, len(hidden), len(ids))
    draft = torch.tensor(heads.candidates(hidden, model, [0] * len(hidden)))
    assert draft.shape == full.shape
    assert bool(keep[draft].all())  # always inside the draft vocabulary
    inside = keep[full].all(-1)  # [B, nh]: the full top-k lies inside
    assert inside.any() and (~inside).any()
    assert torch.equal(draft[inside], full[inside])
    assert not torch.equal(draft[~inside], full[~inside])
    # the draft top-k is the full top-k among the draft vocabulary's tokens
    unembed = (torch.stack([lm.weight for lm in heads.lm_heads]).transpose(1, 2) if own
               else model.unembed_weight().T)
    logits = heads.head_hidden(hidden) @ unembed
    masked = logits.masked_fill(~keep, float("-inf")).topk(K, -1).indices.transpose(0, 1)
    assert torch.equal(draft, masked)
    heads.set_draft_vocab(None)  # back to the full vocabulary
    assert torch.equal(torch.tensor(heads.candidates(hidden, model, [0] * len(hidden))), full)


def test_sliced_unembedding_is_built_once_and_follows_dtype(model):
    heads = _heads()
    heads.set_draft_vocab(torch.arange(0, V, 2))
    heads.prepare(model)
    w = heads._shared_rows.rows
    assert w.shape == (V // 2, H) and torch.equal(w, model.unembed_weight()[::2])
    heads.candidates(_hidden(4), model, [0] * 4)
    heads.candidates(_hidden(4, seed=1), model, [0] * 4)
    assert heads._shared_rows.rows is w  # cached, not rebuilt per step
    m32 = random_causal_lm(tiny_config(vocab=V, hidden=H), torch.float32, seed=3)
    h32 = heads.float()
    assert h32.draft_vocab.dtype == torch.int64  # .to(dtype) leaves the token ids alone
    c = h32.candidates(_hidden(4).float(), m32, [0] * 4)
    assert h32._shared_rows.rows.dtype == torch.float32 and h32._shared_rows.rows is not w
    assert all(t % 2 == 0 for row in c for head in row for t in head)


def test_round_trip_and_old_folders(tmp_path, model):
    cfg = model.config
    heads = _heads()
    save_project_heads(heads, tmp_path / "old", cfg)
    meta = json.loads((tmp_path / "old" / "heads.json").read_text())
    assert "draft_vocab_size" not in meta
    assert load_heads(tmp_path / "old", cfg).draft_vocab is None  # full vocabulary
    ids = torch.tensor([1, 5, 9, 200, 255])
    heads.set_draft_vocab(ids)
    save_project_heads(heads, tmp_path / "new", cfg, training={"x": 1})
    meta = json.loads((tmp_path / "new" / "heads.json").read_text())
    assert meta["draft_vocab_size"] == 5 and meta["training"] == {"x": 1}
    loaded = load_heads(tmp_path / "new", cfg)
    assert torch.equal(loaded.draft_vocab, ids) and loaded.draft_vocab.dtype == torch.int64
    assert loaded.state_dict().keys() == _heads().state_dict().keys()  # not a weight
    # adding one to an existing folder keeps the weights and the rest of heads.json
    add_draft_vocab(tmp_path / "old", cfg, torch.tensor([0, 7]), info={"top_n": 2})
    meta = json.loads((tmp_path / "old" / "heads.json").read_text())
    assert meta["draft_vocab_size"] == 2 and meta["draft_vocab"] == {"top_n": 2}
    assert list(meta)[-1] == "training"
    again = load_heads(tmp_path / "old", cfg)
    assert again.draft_vocab.tolist() == [0, 7]
    for a, b in zip(heads.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a.float(), b)


def _write_draft_vocab(folder, ids: torch.Tensor) -> None:
    from safetensors.torch import load_file, save_file

    f = folder / "heads.safetensors"
    t = load_file(str(f))
    t["draft_vocab"] = ids
    save_file(t, str(f))


def test_bad_draft_vocab_is_refused_naming_the_file(tmp_path, model):
    cfg = model.config
    save_project_heads(_heads(), tmp_path / "h", cfg)
    f = tmp_path / "h" / "heads.safetensors"
    _write_draft_vocab(tmp_path / "h", torch.tensor([3, 10, V]))
    with pytest.raises(ValueError, match=f"token id {V}, outside the model's vocabulary of {V}"
                       ) as e:
        load_heads(tmp_path / "h", cfg)
    assert str(f) in str(e.value)
    _write_draft_vocab(tmp_path / "h", torch.tensor([10, 3]))
    with pytest.raises(ValueError, match="sorted") as e:
        load_heads(tmp_path / "h", cfg)
    assert str(f) in str(e.value)
    _write_draft_vocab(tmp_path / "h", torch.tensor([3.0, 10.0]))
    with pytest.raises(ValueError, match="integer token ids"):
        load_heads(tmp_path / "h", cfg)
    _write_draft_vocab(tmp_path / "h", torch.tensor([3, 10]))
    meta = json.loads((tmp_path / "h" / "heads.json").read_text())
    (tmp_path / "h" / "heads.json").write_text(json.dumps(meta | {"draft_vocab_size": 3}))
    with pytest.raises(ValueError, match="draft_vocab_size 3"):
        load_heads(tmp_path / "h", cfg)
    with pytest.raises(ValueError, match=f"token id {V}"):
        add_draft_vocab(tmp_path / "h", cfg, torch.tensor([0, V]))


# -- built from data ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cached(model):
    g = torch.Generator().manual_seed(5)
    examples = [Example(torch.randint(0, 40, (30,), generator=g).tolist(), train_from=5)
                for _ in range(8)]
    return cache_hidden(model, examples)


def test_build_draft_vocab_top_n_plus_head_targets(cached):
    seqs = [0, 1, 2]
    _, tgts = targets_for(cached, seqs, NH, "argmax")
    answer = torch.cat([cached.tokens[int(cached.seq_start[s]) + int(cached.train_from[s]):
                                      int(cached.seq_start[s + 1]) - 1] for s in seqs])
    counts = torch.bincount(answer, minlength=V)
    ids, info = build_draft_vocab(cached, seqs, tgts, 5, V)
    top5 = set(torch.sort(counts, descending=True, stable=True).indices[:5].tolist())
    assert ids.tolist() == sorted(top5 | set(tgts[tgts >= 0].tolist()))
    assert info["answer_tokens"] == len(answer) and info["size"] == len(ids)
    assert info["added_by_targets"] == len(ids) - 5
    assert build_draft_vocab(cached, seqs, tgts, 0, V)[0] is None
    every = build_draft_vocab(cached, seqs, tgts, 10 ** 6, V)[0]  # N past the distinct tokens
    assert every.tolist() == sorted(set(answer.tolist()) | set(tgts[tgts >= 0].tolist()))


def test_train_with_draft_vocab_reports_both(model, cached, tmp_path):
    cfg = TrainConfig(num_heads=2, epochs=1, batch_tokens=64, checkpoint_every=0,
                      holdout_frac=0.25, warmup_steps=1)
    heads, report = train(model, cached, cfg, tmp_path, draft_vocab=8)
    dv = report["draft_vocab"]
    assert heads.draft_vocab is not None
    assert len(heads.draft_vocab) == dv["size"] == dv["heldout"]["vocab"]
    assert len(dv["heldout"]["top1"]) == 2 and all(0 <= x <= 1 for x in dv["heldout"]["in_vocab"])
    # over a draft vocabulary that holds every token, accuracy is the full-vocabulary one
    rows, tgts = targets_for(cached, [0, 1], 2, "argmax")
    full = evaluate(heads, model, cached, rows, tgts)
    every = evaluate(heads, model, cached, rows, tgts, vocab_ids=torch.arange(V))
    assert every["rank_acc"] == full["rank_acc"] and every["in_vocab"] == [1.0, 1.0]


def test_cli_draft_vocab_only_adds_to_existing_heads(tmp_path, capsys):
    from test_train_heads import _tiny_hf_folder, _word_prompts

    from mtpserve.server.cli import main

    model = _tiny_hf_folder(tmp_path)
    prompts = _word_prompts(tmp_path, 13)
    out = tmp_path / "out"
    base = ["train-heads", "--model", model, "--data", str(prompts), "--out", str(out),
            "--num-heads", "2", "--gen-batch", "4", "--generate-max-tokens", "6",
            "--threads", "1", "--holdout-frac", "0.2"]
    assert main(base + ["--epochs", "1", "--batch-tokens", "64", "--draft-vocab", "0"]) == 0
    meta = json.loads((out / "heads.json").read_text())
    assert "draft_vocab_size" not in meta and "draft_vocab" not in meta["training"]
    weights = (out / "heads.safetensors").read_bytes()
    assert main(base + ["--draft-vocab-only", "--draft-vocab", "3"]) == 0
    meta2 = json.loads((out / "heads.json").read_text())
    info = meta2["draft_vocab"]
    assert meta2["draft_vocab_size"] == info["size"] and info["top_n"] == 3
    assert info["split"]["holdout_frac"] == 0.2 and "command" in info
    assert meta2["training"] == meta["training"]  # the heads' own record is untouched
    from safetensors.torch import load_file

    t = load_file(str(out / "heads.safetensors"))
    assert t["draft_vocab"].numel() == info["size"]
    assert weights != (out / "heads.safetensors").read_bytes()
    err = capsys.readouterr().err
    assert "draft vocab (" in err and "draft vocabulary:" in err
    # nothing is generated: an unanswered prompt is an error
    with prompts.open("a") as fh:
        fh.write(json.dumps({"prompt": "w20 w21"}) + "\n")
    with pytest.raises(ValueError, match="generates nothing"):
        main(base + ["--draft-vocab-only"])
