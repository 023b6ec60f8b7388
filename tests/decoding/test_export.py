"""Exports for other engines (decoding/tools/export.py).

- export-model: the default GGUF exported to a Hugging Face folder (fp32) loads in
  transformers with logits equal to our dense fp32 engine's on a chat prompt (test_model_parity's
  tolerance), AutoTokenizer from the folder encodes chats and text to our ids, and our own
  loader reads the folder back (same config fingerprint, same tensors, same tokenizer).
- export-heads --format vllm-medusa, without vLLM installed: the export is read back by a
  mirror of vLLM's Medusa model (vllm/model_executor/models/medusa.py: module names, config
  handling, load_weights, compute_logits; see `VllmMedusaMirror`) and its draft logits equal
  the original heads' on the same hidden states: shared or own unembedding, with and without
  a draft vocabulary (vLLM's token_map), through the function and through the CLI.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from decoding_helpers import chat, prefill_logits, random_causal_lm, randomize_, tiny_config
from mtpserve.decoding.tools.export import export_heads_vllm
from mtpserve.decoding.spec.heads import MedusaHeads
from mtpserve.decoding.spec.heads_io import save_project_heads
from mtpserve.server.cli import main

CHAT = [{"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Name three prime numbers, then say why 1 is not one."}]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """The embedded default model exported once (fp32) through the command line."""
    out = tmp_path_factory.mktemp("export") / "smollm2-hf"
    assert main(["export-model", "--out", str(out)]) == 0
    return out


# -- export-model ------------------------------------------------------------------------------
def test_exported_model_files(exported):
    names = sorted(p.name for p in exported.iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors",
                     "tokenizer.json", "tokenizer_config.json"]
    cfg = json.loads((exported / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert cfg["tie_word_embeddings"] is True and cfg["torch_dtype"] == "float32"
    from safetensors import safe_open

    with safe_open(str(exported / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert f.metadata() == {"format": "pt"}
    assert "model.embed_tokens.weight" in keys and "model.norm.weight" in keys
    assert "model.layers.29.self_attn.q_proj.weight" in keys
    assert "lm_head.weight" not in keys  # tied
    assert len(keys) == 2 + 30 * 9
    assert "chat_template" in json.loads((exported / "tokenizer_config.json").read_text())


def test_exported_model_logits_match_engine(default_engine, exported):
    transformers = pytest.importorskip("transformers")
    ids = chat(default_engine.tokenizer, CHAT[1]["content"])
    ours = prefill_logits(default_engine.model, ids)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(exported), dtype=torch.float32)
    with torch.no_grad():
        ref = hf.eval()(torch.tensor([ids])).logits[0].float()
    assert ours.shape == ref.shape
    assert ref.abs().max().item() > 5.0
    diff = (ours - ref).abs().max().item()
    assert diff < 1e-3, f"max |ours - transformers on the export| = {diff}"  # as test_model_parity
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_exported_tokenizer_matches_ours(default_engine, exported):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(exported))
    ours = default_engine.tokenizer
    for messages in (CHAT, CHAT[1:]):
        got = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        got = got["input_ids"] if not isinstance(got, list) else got
        assert got == ours.encode_chat(messages)
    text = "Hello <|im_start|>world\n\n  def f(x):  return x**2  # 3.14159 émoji 🙂"
    assert tok(text)["input_ids"] == ours.encode(text)
    ids = ours.encode(text)
    assert tok.decode(ids, skip_special_tokens=False) == ours.decode(ids, skip_special_tokens=False)
    assert tok.convert_tokens_to_ids(tok.eos_token) == ours.eos_token_ids[0]
    assert tok.convert_tokens_to_ids(tok.bos_token) == ours.bos_token_id
    gen = json.loads((exported / "generation_config.json").read_text())
    assert gen["eos_token_id"] == list(ours.eos_token_ids)  # every id the engine stops on


def test_exported_folder_reads_back(default_engine, exported):
    from mtpserve.decoding.model.checkpoint import load_checkpoint

    ck = load_checkpoint(str(exported))
    cfg, base = ck.config, default_engine.model_config
    assert cfg.fingerprint() == base.fingerprint()  # heads made for the GGUF fit the export
    for k in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
              "num_kv_heads", "head_dim", "rope_theta", "max_position_embeddings",
              "tie_word_embeddings", "bos_token_id"):
        assert getattr(cfg, k) == getattr(base, k), k
    assert cfg.rms_norm_eps == pytest.approx(base.rms_norm_eps, rel=1e-6)
    assert cfg.eos_token_ids == base.eos_token_ids
    m = default_engine.model
    assert torch.equal(ck.tensors["embed_tokens.weight"], m.embed_tokens.weight)
    assert torch.equal(ck.tensors["norm.weight"], m.norm.weight)
    assert torch.equal(ck.tensors["layers.7.input_layernorm.weight"],
                       m.layers[7].input_layernorm.weight)
    assert ck.tokenizer.encode_chat(CHAT) == default_engine.tokenizer.encode_chat(CHAT)
    assert ck.tokenizer.chat_template == default_engine.tokenizer.chat_template


def test_export_model_refuses_a_non_empty_folder(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("x")
    assert main(["export-model", "--model", str(tmp_path / "nope.gguf"),
                 "--out", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err


# -- export-heads --format vllm-medusa ------------------------------------------------------
class _ResidualBlock(nn.Module):
    """vLLM's ResidualBlock: layers = [nn.Linear(h, h, bias=medusa_fc_bias)] * num_layers
    (distinct), x = x + SiLU(layer(x)) for each layer."""

    def __init__(self, hidden: int, num_layers: int, bias: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden, bias=bias) for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + F.silu(layer(x))
        return x


class VllmMedusaMirror(nn.Module):
    """vLLM's Medusa draft model as its source reads (vllm-project/vllm,
    vllm/model_executor/models/medusa.py at 09cddad8f032, and the MedusaConfig of
    vllm/transformers_utils/configs/medusa.py), with plain nn.Linear for ParallelLMHead
    (tensor parallel 1, no vocabulary padding). Independent of decoding/tools/export.py.

    num_speculative_tokens: vLLM's SpeculativeConfig sets hf_config.num_lookahead_tokens to
    it, whose setter sets num_heads: the drafter then builds that many heads.
    """

    def __init__(self, folder: Path, num_speculative_tokens: int | None = None) -> None:
        super().__init__()
        raw = json.loads((folder / "config.json").read_text())
        assert raw["model_type"] == "medusa" and raw["architectures"] == ["MedusaModel"]
        cfg = dict(raw)
        for k in list(cfg):  # MedusaConfig.from_pretrained's renaming
            if "num" in k:
                if "heads" in k:
                    cfg["num_heads"] = cfg.pop(k)
                elif "layers" in k:
                    cfg["num_hidden_layers"] = cfg.pop(k)
        # MedusaConfig.__init__ defaults
        hidden, vocab = cfg.get("hidden_size", 4096), cfg.get("vocab_size", 32001)
        n, layers = cfg.get("num_heads", 5), cfg.get("num_hidden_layers", 1)
        truncated = cfg.get("truncated_vocab_size")
        truncated = vocab if truncated is None else truncated
        if num_speculative_tokens is not None:
            n = num_speculative_tokens
        self.config = cfg
        self.blocks = nn.ModuleList(_ResidualBlock(hidden, layers, cfg.get("medusa_fc_bias", False))
                                    for _ in range(n))
        self.orig_vocab_size, self.truncated_vocab_size = vocab, truncated
        if cfg.get("original_lm_head", False):
            self.lm_head = nn.Linear(hidden, truncated, bias=False)
            self.lm_heads = [self.lm_head for _ in range(n)]
        else:
            self.lm_heads = nn.ModuleList(nn.Linear(hidden, truncated, bias=False)
                                          for _ in range(n))
        self.token_map = None
        self.ignored: list[str] = []  # names vLLM's load_weights silently skips

    def load_weights(self, weights: dict[str, torch.Tensor]) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        weights_map = {}
        for name, w in weights.items():
            name = name.replace("medusa_heads.", "")
            if name == "token_map":
                if self.truncated_vocab_size < self.orig_vocab_size:
                    self.token_map = w
            elif name in params:
                weights_map[name] = w
            elif self.config.get("original_lm_head", False) and name == "lm_heads.0.weight":
                weights_map["lm_head.weight"] = w
            else:
                self.ignored.append(name)
        for name, w in weights_map.items():
            if "lm_head" in name and self.token_map is not None and \
                    w.shape[0] > self.token_map.shape[0]:
                w = w[self.token_map]
            p = params[name]
            assert p.shape == w.shape, (name, p.shape, w.shape)  # default_weight_loader
            with torch.no_grad():
                p.copy_(w)
            loaded.add(name)
        assert self.truncated_vocab_size == self.orig_vocab_size or self.token_map is not None
        # DefaultModelLoader: "Following weights were not initialized from checkpoint"
        assert not set(params) - loaded, sorted(set(params) - loaded)
        return loaded

    def forward(self, hidden: torch.Tensor) -> list[torch.Tensor]:
        return [block(hidden) for block in self.blocks]

    def compute_logits(self, hs: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for h, lm in zip(hs, self.lm_heads):
            logits = lm(h)
            if self.token_map is not None:
                full = -torch.inf * torch.ones(*logits.shape[:-1], self.orig_vocab_size,
                                               dtype=logits.dtype)
                full[..., self.token_map] = logits
                logits = full
            out.append(logits)
        return out

    @classmethod
    def load(cls, folder: Path, num_speculative_tokens: int | None = None) -> VllmMedusaMirror:
        from safetensors.torch import load_file

        m = cls(folder, num_speculative_tokens)
        m.load_weights(load_file(str(folder / "model.safetensors")))
        return m.eval()


def _ours_full_vocab(heads: MedusaHeads, hidden: torch.Tensor, model) -> torch.Tensor:
    """Our heads' logits over the full vocabulary, -inf outside a draft vocabulary."""
    with torch.no_grad():
        logits = heads.head_logits(hidden, model)
    dv = getattr(heads, "draft_vocab", None)
    if dv is None:
        return logits
    full = torch.full((*logits.shape[:-1], heads.vocab_size), -torch.inf)
    full[..., dv] = logits
    return full


def _check_round_trip(heads, model, out: Path, hidden: torch.Tensor) -> VllmMedusaMirror:
    mirror = VllmMedusaMirror.load(out)
    assert mirror.ignored == []  # nothing written that vLLM would skip
    with torch.no_grad():
        theirs = torch.stack(mirror.compute_logits(mirror(hidden)))
    ours = _ours_full_vocab(heads, hidden, model)
    assert theirs.shape == ours.shape
    finite = torch.isfinite(ours)
    assert torch.equal(finite, torch.isfinite(theirs))
    torch.testing.assert_close(theirs[finite], ours[finite], rtol=1e-5, atol=1e-5)
    # vLLM's MedusaProposer drafts each head's argmax: our top-1 per head.
    with torch.no_grad():
        top1 = heads.topk_tokens(hidden, model, 1)[..., 0] if hasattr(heads, "topk_tokens") \
            else heads.head_logits(hidden, model).argmax(-1)
    assert torch.equal(theirs.argmax(-1), top1)
    return mirror


VOCAB, HIDDEN = 256, 32


@pytest.mark.parametrize("own,draft", [(False, False), (False, True), (True, False), (True, True)],
                         ids=["shared", "shared-draft-vocab", "own", "own-draft-vocab"])
def test_vllm_medusa_round_trip(tmp_path, own, draft):
    cfg = tiny_config(vocab=VOCAB, hidden=HIDDEN)
    model = random_causal_lm(cfg, torch.float32, seed=3)
    heads = randomize_(MedusaHeads(HIDDEN, VOCAB, num_heads=3, num_layers=2, own_unembedding=own),
                       seed=4).float().eval()
    if draft:
        if not hasattr(heads, "set_draft_vocab"):
            pytest.skip("this MedusaHeads has no draft vocabulary")
        heads.set_draft_vocab(torch.randperm(VOCAB, generator=torch.Generator().manual_seed(5))[:40]
                              .sort().values)
    unembed = None if own else model.unembed_weight().detach()
    out = export_heads_vllm(heads, cfg, unembed, tmp_path / "vllm-medusa")
    meta = json.loads((out / "config.json").read_text())
    assert (meta["num_heads"], meta["num_hidden_layers"], meta["original_lm_head"],
            meta["medusa_fc_bias"]) == (3, 2, not own, True)
    assert meta["truncated_vocab_size"] == (40 if draft else VOCAB)
    from safetensors.torch import load_file

    names = set(load_file(str(out / "model.safetensors")))
    lm = {"lm_heads.0.weight"} if not own else {f"lm_heads.{i}.weight" for i in range(3)}
    assert names == ({f"blocks.{i}.layers.{j}.{w}" for i in range(3) for j in range(2)
                      for w in ("weight", "bias")} | lm | ({"token_map"} if draft else set()))
    hidden = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(6))
    mirror = _check_round_trip(heads, model, out, hidden)
    assert (mirror.token_map is not None) == draft

    # num_speculative_tokens < num_heads: vLLM builds the first N heads, skips the rest.
    two = VllmMedusaMirror.load(out, num_speculative_tokens=2)
    with torch.no_grad():
        a = torch.stack(two.compute_logits(two(hidden)))
        b = torch.stack(mirror.compute_logits(mirror(hidden)))[:2]
    assert torch.equal(a, b)


def test_vllm_medusa_bf16_export(tmp_path):
    cfg = tiny_config(vocab=VOCAB, hidden=HIDDEN)
    model = random_causal_lm(cfg, torch.float32, seed=3)
    heads = randomize_(MedusaHeads(HIDDEN, VOCAB, 2, 1), seed=4).float().eval()
    out = export_heads_vllm(heads, cfg, model.unembed_weight().detach(), tmp_path / "o",
                            dtype="bfloat16")
    from safetensors.torch import load_file

    t = load_file(str(out / "model.safetensors"))
    assert {v.dtype for v in t.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert torch.equal(t["blocks.1.layers.0.weight"],
                       heads.blocks[1][0].linear.weight.to(torch.bfloat16))


def test_export_heads_cli_on_the_default_model(default_engine, exported, tmp_path):
    """Project-format heads for the default model -> CLI export (the exported folder as
    --model, which the heads' base fingerprint accepts) -> vLLM mirror == our heads."""
    base = default_engine.model_config
    heads = randomize_(MedusaHeads(base.hidden_size, base.vocab_size, 2, 1), seed=7).float().eval()
    save_project_heads(heads, tmp_path / "heads", base)
    out = tmp_path / "vllm-medusa"
    assert main(["export-heads", "--heads", str(tmp_path / "heads"), "--format", "vllm-medusa",
                 "--model", str(exported), "--out", str(out)]) == 0
    hidden = torch.randn(3, base.hidden_size, generator=torch.Generator().manual_seed(8))
    _check_round_trip(heads, default_engine.model, out, hidden)
    assert main(["export-heads", "--heads", str(tmp_path / "heads"), "--model", str(exported),
                 "--out", str(out)]) == 2  # not empty without --force


def test_export_heads_cli_full_vocabulary_drops_the_token_map(default_engine, exported, tmp_path):
    """vLLM 0.32's Medusa loader refuses a token_map: --full-vocabulary writes heads with a
    draft vocabulary over the whole vocabulary instead (without it the map is kept)."""
    from safetensors.torch import load_file

    base = default_engine.model_config
    heads = randomize_(MedusaHeads(base.hidden_size, base.vocab_size, 2, 1), seed=9).float().eval()
    heads.set_draft_vocab(torch.arange(0, base.vocab_size, 7))
    save_project_heads(heads, tmp_path / "heads", base)
    common = ["export-heads", "--heads", str(tmp_path / "heads"), "--model", str(exported)]
    assert main(common + ["--out", str(tmp_path / "mapped")]) == 0
    assert main(common + ["--full-vocabulary", "--out", str(tmp_path / "full")]) == 0
    mapped = load_file(str(tmp_path / "mapped" / "model.safetensors"))
    full = load_file(str(tmp_path / "full" / "model.safetensors"))
    assert "token_map" in mapped and "token_map" not in full
    cfg = json.loads((tmp_path / "full" / "config.json").read_text())
    assert cfg["truncated_vocab_size"] == base.vocab_size
    heads.set_draft_vocab(None)
    hidden = torch.randn(3, base.hidden_size, generator=torch.Generator().manual_seed(8))
    _check_round_trip(heads, default_engine.model, tmp_path / "full", hidden)
