"""Invariant 1: the trunk's logits equal transformers' on the same weights.

- The default model (GGUF, fp32): our loader (dequantize + un-permute q/k) and trunk against
  transformers' own GGUF loader and Llama, atol 1e-3 (measured ~1e-4 with logits ~30) and the
  same argmax at every position.
- Tiny random models of every supported family (Llama with and without llama3 / linear rope
  scaling, Mistral, Qwen2 with q/k/v bias, Qwen3 with q/k norm and a head_dim that is not
  hidden/heads), saved by transformers as safetensors and read through our HF loader, compared
  in float64. Rotary tables are float32 on both sides by design (ours: computed in float64 and
  rounded; transformers': computed in float32), so the float64 check runs twice: with
  transformers' cos/sin copied into our rotary buffers (everything else must agree to 1e-9) and
  with our own tables (rope's float32 rounding allowed: 1e-6).
- Packing: sequences of different lengths in ONE step give the same logits as each alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from decoding_helpers import hf_default_model, logits64, prefill_hidden, prefill_logits
from mtpserve.decoding.model.checkpoint import hf_config, read_safetensors_folder
from mtpserve.decoding.model.trunk import CausalLM
from mtpserve.decoding.model.trunk_weights import load_trunk_weights

transformers = pytest.importorskip("transformers")

PARITY_TEXT = ("The quick brown fox jumps over the lazy dog, and then the dog "
               "chases the fox around the old red barn.")


# -- the default model --------------------------------------------------------------------
def test_default_model_logits_match_transformers(default_engine):
    ids = default_engine.tokenizer.encode(PARITY_TEXT)
    assert 15 <= len(ids) <= 40
    ours = prefill_logits(default_engine.model, ids)
    hf = hf_default_model()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    assert ours.shape == ref.shape
    diff = (ours - ref).abs().max().item()
    assert ref.abs().max().item() > 5.0  # real logits, not a degenerate model
    assert diff < 1e-3, f"max |ours - transformers| = {diff}"
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_default_model_config_matches_transformers(default_engine):
    cfg, hf_cfg = default_engine.model_config, hf_default_model().config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (
        hf_cfg.vocab_size, hf_cfg.hidden_size, hf_cfg.num_hidden_layers,
        hf_cfg.num_attention_heads, hf_cfg.num_key_value_heads)
    assert cfg.intermediate_size == hf_cfg.intermediate_size
    assert cfg.rms_norm_eps == pytest.approx(hf_cfg.rms_norm_eps, rel=1e-6)


# -- tiny random models of each family -------------------------------------------------------
COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              rms_norm_eps=1e-6)


def _families() -> dict:
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    return {
        "llama": lambda: LlamaConfig(**COMMON, rope_theta=10000.0),
        "llama-llama3-rope": lambda: LlamaConfig(**COMMON, rope_theta=500000.0,
                                                 rope_scaling=dict(llama3)),
        "llama-linear-rope": lambda: LlamaConfig(**COMMON, rope_theta=10000.0,
                                                 rope_scaling={"rope_type": "linear",
                                                               "factor": 4.0}),
        "mistral": lambda: MistralConfig(**COMMON, rope_theta=1000000.0, sliding_window=None),
        "qwen2": lambda: Qwen2Config(**COMMON, rope_theta=1000000.0, use_sliding_window=False,
                                     tie_word_embeddings=True),
        "qwen3": lambda: Qwen3Config(**{**COMMON, "num_hidden_layers": 3}, head_dim=24,
                                     rope_theta=1000000.0, attention_bias=False),
    }


def _legacy_rope_keys(raw: dict) -> dict:
    """transformers >= 5 writes `rope_parameters`; Hub checkpoints carry the older
    top-level `rope_theta` + `rope_scaling`. Rewrite to the older form."""
    raw = dict(raw)
    rp = raw.pop("rope_parameters", None)
    if rp is not None:
        rp = dict(rp)
        raw["rope_theta"] = rp.pop("rope_theta", 10000.0)
        raw["rope_scaling"] = None if rp.get("rope_type", "default") == "default" else rp
    return raw


def _build_hf(family: str, tmp_path: Path, legacy_config: bool = True):
    """A random float64 transformers model saved as safetensors; returns (hf_model, folder)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1234)
    hf = AutoModelForCausalLM.from_config(_families()[family](), dtype=torch.float64).eval()
    with torch.no_grad():  # norms and biases away from their init so they matter
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    folder = tmp_path / family
    hf.save_pretrained(folder, safe_serialization=True)
    if legacy_config:
        cfg_file = folder / "config.json"
        cfg_file.write_text(json.dumps(_legacy_rope_keys(json.loads(cfg_file.read_text()))))
    return hf, folder


def _load_ours(folder: Path) -> CausalLM:
    cfg = hf_config(json.loads((folder / "config.json").read_text()), folder)
    model = CausalLM(cfg).to(torch.float64)  # float64 first: loading casts to the param dtype
    load_trunk_weights(model, read_safetensors_folder(folder))
    return model.eval()


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in (37, 11, 60)]


def _hf_rope_into(ours: CausalLM, hf, n: int) -> None:
    """Copy transformers' float32-computed cos/sin for positions [0, n) into our tables."""
    with torch.no_grad():
        cos, sin = hf.model.rotary_emb(torch.zeros(1, dtype=torch.float64),
                                       torch.arange(n)[None])
    half = ours.config.head_dim // 2
    ours.rope.cos = ours.rope.cos.to(torch.float64)
    ours.rope.sin = ours.rope.sin.to(torch.float64)
    ours.rope.cos[:n] = cos[0, :, :half]
    ours.rope.sin[:n] = sin[0, :, :half]


@pytest.mark.parametrize("family", list(_families()))
def test_family_logits_match_transformers_float64(family, tmp_path):
    hf, folder = _build_hf(family, tmp_path)
    ours = _load_ours(folder)
    cfg = ours.config
    if family == "qwen2":
        assert cfg.attention_bias and cfg.tie_word_embeddings
    if family == "qwen3":
        assert cfg.qk_norm and cfg.head_dim == 24 != cfg.hidden_size // cfg.num_heads
    if "rope" in family:
        assert cfg.rope_scaling is not None
    rope_params = getattr(hf.config, "rope_parameters", None) or {}
    assert cfg.rope_theta == rope_params.get("rope_theta", getattr(hf.config, "rope_theta", None))

    prompts = _prompts()
    with torch.no_grad():
        refs = [hf(torch.tensor([p])).logits[0] for p in prompts]
    # 1) our own float32 rope tables: the only difference allowed is their rounding.
    hidden, _ = prefill_hidden(ours, prompts)
    for h, ref in zip(hidden, refs):
        assert h.dtype == torch.float64
        diff = (logits64(ours, h) - ref).abs().max().item()
        assert diff < 1e-6, f"{family}: max diff {diff} (rope tables?)"
    # 2) transformers' rope tables: everything else must agree to float64 precision.
    _hf_rope_into(ours, hf, max(len(p) for p in prompts))
    hidden, _ = prefill_hidden(ours, prompts)
    for h, ref in zip(hidden, refs):
        diff = (logits64(ours, h) - ref).abs().max().item()
        assert diff < 1e-9, f"{family}: max diff {diff}"


@pytest.mark.parametrize("family", ["llama-llama3-rope", "llama-linear-rope"])
def test_rope_tables_match_transformers(family, tmp_path):
    hf, folder = _build_hf(family, tmp_path)
    ours = _load_ours(folder)
    n = 64
    with torch.no_grad():
        cos, sin = hf.model.rotary_emb(torch.zeros(1, dtype=torch.float32), torch.arange(n)[None])
    half = ours.config.head_dim // 2
    assert torch.allclose(ours.rope.cos[:n].float(), cos[0, :, :half], atol=2e-6, rtol=0)
    assert torch.allclose(ours.rope.sin[:n].float(), sin[0, :, :half], atol=2e-6, rtol=0)


def test_hf_config_reads_transformers5_rope_parameters(tmp_path):
    _, folder = _build_hf("llama-llama3-rope", tmp_path)
    raw = json.loads((folder / "config.json").read_text())  # legacy form: read correctly ...
    legacy = hf_config(raw, folder)
    assert legacy.rope_theta == 500000.0 and legacy.rope_scaling["rope_type"] == "llama3"
    # ... and the same config as transformers >= 5 writes it (config.json of save_pretrained).
    raw["rope_parameters"] = {**raw.pop("rope_scaling"), "rope_theta": raw.pop("rope_theta")}
    cfg = hf_config(raw, folder)
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling is not None and cfg.rope_scaling.get("rope_type") == "llama3"


# -- packing ---------------------------------------------------------------------------------
@pytest.mark.parametrize("slots", [[0, 1], [1, 0]], ids=["contiguous", "permuted"])
def test_packed_step_equals_each_alone(tmp_path, slots):
    hf, folder = _build_hf("qwen3", tmp_path)
    ours = _load_ours(folder)
    a, b = _prompts()[:2]  # 37 and 11 tokens: the short one is padded in the packed step
    (ha, hb), kv = prefill_hidden(ours, [a, b], slots=slots)
    (ha1,), kv_a = prefill_hidden(ours, [a])
    (hb1,), kv_b = prefill_hidden(ours, [b])
    assert torch.allclose(logits64(ours, ha), logits64(ours, ha1), atol=1e-12, rtol=0)
    assert torch.allclose(logits64(ours, hb), logits64(ours, hb1), atol=1e-12, rtol=0)
    # The cache rows the packed step wrote are those each sequence writes alone.
    row_a = kv.buf[:, :, slots[0], :, :len(a)]
    row_b = kv.buf[:, :, slots[1], :, :len(b)]
    assert torch.allclose(row_a, kv_a.buf[:, :, 0, :, :len(a)], atol=1e-12, rtol=0)
    assert torch.allclose(row_b, kv_b.buf[:, :, 0, :, :len(b)], atol=1e-12, rtol=0)
    # And they agree with transformers on the packed step too.
    with torch.no_grad():
        ref_b = hf(torch.tensor([b])).logits[0]
    _hf_rope_into(ours, hf, len(a))
    (_, hb2), _ = prefill_hidden(ours, [a, b], slots=slots)
    assert (logits64(ours, hb2) - ref_b).abs().max().item() < 1e-9
