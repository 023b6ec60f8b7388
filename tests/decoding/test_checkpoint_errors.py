"""Checkpoint loading fails with a ValueError that names the file and the offending field or
tensor (checkpoint.py's contract), and a well-formed tiny HF folder loads and generates."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mtpserve.decoding.model.checkpoint import default_model_path, load_checkpoint
from mtpserve.decoding.config import EngineConfig, SamplingParams, SpecConfig
from mtpserve.decoding.engine.llm_engine import LLMEngine

VOCAB, HIDDEN, INTER, LAYERS, HEADS, KV_HEADS = 64, 32, 48, 2, 4, 2
HEAD_DIM = HIDDEN // HEADS


def _config() -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": INTER,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "max_position_embeddings": 128, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2,
    }


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    t = {"model.embed_tokens.weight": r(VOCAB, HIDDEN), "model.norm.weight": torch.ones(HIDDEN),
         "lm_head.weight": r(VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        t.update({
            p + "self_attn.q_proj.weight": r(HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.k_proj.weight": r(KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.v_proj.weight": r(KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.o_proj.weight": r(HIDDEN, HEADS * HEAD_DIM),
            p + "mlp.gate_proj.weight": r(INTER, HIDDEN),
            p + "mlp.up_proj.weight": r(INTER, HIDDEN),
            p + "mlp.down_proj.weight": r(HIDDEN, INTER),
            p + "input_layernorm.weight": torch.ones(HIDDEN),
            p + "post_attention_layernorm.weight": torch.ones(HIDDEN),
        })
    return t


def _write_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))


def make_folder(root: Path, config: dict | None = None,
                tensors: dict[str, torch.Tensor] | None = None) -> Path:
    from safetensors.torch import save_file

    folder = root / "tiny-hf"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config if config is not None else _config()))
    save_file(tensors if tensors is not None else _tensors(), str(folder / "model.safetensors"))
    _write_tokenizer(folder)
    return folder


def engine_for(folder: Path) -> LLMEngine:
    return LLMEngine.from_config(EngineConfig(model=str(folder), dtype="float32", device="cpu",
                                              max_num_seqs=1, max_model_len=64,
                                              spec=SpecConfig(mode="on", proposer="ngram")))


def test_tiny_hf_folder_loads_and_generates(tmp_path):
    folder = make_folder(tmp_path)
    ckpt = load_checkpoint(str(folder))
    assert ckpt.config.architecture == "llama" and not ckpt.config.tie_word_embeddings
    assert ckpt.config.eos_token_ids == (2,)
    eng = engine_for(folder)
    out = eng.generate([[3, 4, 5, 6]], SamplingParams(max_tokens=8, temperature=0.0,
                                                      ignore_eos=True))
    assert len(out[0]["token_ids"]) == 8 and out[0]["finish_reason"] == "length"


def test_truncated_gguf_names_the_file(tmp_path):
    bad = tmp_path / "truncated.gguf"
    with open(default_model_path(), "rb") as f:
        bad.write_bytes(f.read(1 << 20))
    with pytest.raises(ValueError) as exc:
        load_checkpoint(str(bad))
    assert str(bad) in str(exc.value)


def test_nonexistent_path(tmp_path):
    missing = tmp_path / "nope" / "model.gguf"
    with pytest.raises(ValueError, match="no such file") as exc:
        load_checkpoint(str(missing))
    assert str(missing) in str(exc.value)


def test_not_a_checkpoint_file(tmp_path):
    f = tmp_path / "weights.txt"
    f.write_text("hello")
    with pytest.raises(ValueError, match="unrecognised checkpoint") as exc:
        load_checkpoint(str(f))
    assert str(f) in str(exc.value)


def test_folder_without_config_or_gguf(tmp_path):
    (tmp_path / "readme.md").write_text("x")
    with pytest.raises(ValueError, match="config.json") as exc:
        load_checkpoint(str(tmp_path))
    assert str(tmp_path) in str(exc.value)


def test_bin_only_folder(tmp_path):
    folder = tmp_path / "bin-only"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(_config()))
    torch.save(_tensors(), folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"safetensors") as exc:
        load_checkpoint(str(folder))
    assert str(folder) in str(exc.value) and ".bin" in str(exc.value)


def test_unknown_architecture(tmp_path):
    cfg = _config() | {"architectures": ["GPT2LMHeadModel"]}
    folder = make_folder(tmp_path, config=cfg)
    with pytest.raises(ValueError, match="GPT2LMHeadModel") as exc:
        load_checkpoint(str(folder))
    assert str(folder / "config.json") in str(exc.value)


@pytest.mark.parametrize("field", ["hidden_size", "num_hidden_layers", "vocab_size",
                                   "intermediate_size", "num_attention_heads"])
def test_missing_config_field(tmp_path, field):
    cfg = _config()
    del cfg[field]
    folder = make_folder(tmp_path, config=cfg)
    with pytest.raises(ValueError, match=field) as exc:
        load_checkpoint(str(folder))
    assert str(folder / "config.json") in str(exc.value)


def test_invalid_config_json(tmp_path):
    folder = make_folder(tmp_path)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON") as exc:
        load_checkpoint(str(folder))
    assert str(folder / "config.json") in str(exc.value)


def test_index_names_a_missing_shard(tmp_path):
    folder = make_folder(tmp_path)
    index = {"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors",
                            "lm_head.weight": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copy(folder / "model.safetensors", folder / "model-00001-of-00002.safetensors")
    with pytest.raises(ValueError, match="model-00002-of-00002.safetensors"):
        load_checkpoint(str(folder))


def _engine_error(tmp_path, tensors) -> str:
    folder = make_folder(tmp_path, tensors=tensors)
    with pytest.raises(ValueError) as exc:
        engine_for(folder)
    return str(exc.value)


def test_missing_tensor_is_named(tmp_path):
    t = _tensors()
    del t["model.layers.1.mlp.down_proj.weight"]
    msg = _engine_error(tmp_path, t)
    assert "missing tensor layers.1.mlp.down_proj.weight" in msg
    assert f"[{HIDDEN}, {INTER}]" in msg  # the expected shape


def test_wrong_shape_is_named(tmp_path):
    t = _tensors()
    t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(HEADS * HEAD_DIM, HIDDEN)
    msg = _engine_error(tmp_path, t)
    assert "layers.0.self_attn.k_proj.weight" in msg
    assert f"[{HEADS * HEAD_DIM}, {HIDDEN}]" in msg and f"[{KV_HEADS * HEAD_DIM}, {HIDDEN}]" in msg


def test_unexpected_tensor_is_named(tmp_path):
    t = _tensors() | {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(HEAD_DIM // 2),
                      "model.extra_adapter.weight": torch.ones(3)}
    msg = _engine_error(tmp_path, t)
    assert "unexpected tensor extra_adapter.weight" in msg
    assert "inv_freq" not in msg  # ignorable leftovers are not reported


def test_untied_model_without_lm_head_is_reported(tmp_path):
    t = _tensors()
    del t["lm_head.weight"]
    assert "missing tensor lm_head.weight" in _engine_error(tmp_path, t)


def test_tensor_errors_name_the_checkpoint(tmp_path):
    t = _tensors()
    del t["model.layers.1.mlp.down_proj.weight"]
    folder = tmp_path / "tiny-hf"
    assert str(folder) in _engine_error(tmp_path, t)
