"""Exports for other engines: `export-model` (a Hugging Face folder from a GGUF file or any
checkpoint we read) and `export-heads --format vllm-medusa` (the project's draft heads as the
checkpoint vLLM's Medusa drafter loads).

export-model writes what transformers' `AutoModelForCausalLM` / `AutoTokenizer` and vLLM
read: config.json (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM or
Qwen3ForCausalLM), model.safetensors (sharded with model.safetensors.index.json above
MAX_SHARD_BYTES), tokenizer.json (the `tokenizers` backend our Tokenizer runs, so the ids are
ours), tokenizer_config.json (special tokens and the chat template) and
generation_config.json (BOS and every end-of-generation id the engine stops on). Weights are
the HF-named tensors our loader produces: GGUF blocks dequantized, llama.cpp's q/k row
permutation undone, nothing fused; `lm_head.weight` only for an untied unembedding.

export-heads: see `export_heads_vllm` for the layout and the vLLM source it follows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from ..config import ModelConfig

MAX_SHARD_BYTES = 4 << 30  # transformers' own default shard size is 5 GB

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Our architecture names (decoding/model/checkpoint.py) -> (HF architecture class, model_type).
_HF_ARCH = {
    "llama": ("LlamaForCausalLM", "llama"),
    "mistral": ("MistralForCausalLM", "mistral"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}
_MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json", "model.safetensors", "model.safetensors.index.json")


def _f32(x: float) -> float:
    """GGUF stores eps / theta as float32: write the shortest decimal of that float32
    (1e-05, not 9.999999747378752e-06); the model computes them in float32 either way."""
    return float(str(np.float32(x)))


def _check_out(out: Path, force: bool) -> None:
    """Refuse a file, or a non-empty folder without `force` (checked before a long load)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not force:
        raise ValueError(f"{out}: directory is not empty (pass --force to overwrite)")


def _prepare_out(out: Path, force: bool, names: tuple[str, ...], globs: tuple[str, ...]) -> None:
    _check_out(out, force)
    if out.exists() and any(out.iterdir()):
        stale = [out / n for n in names] + [p for g in globs for p in out.glob(g)]
        for p in stale:
            if p.is_file():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)


# -- export-model ---------------------------------------------------------------------------
def hf_config_dict(cfg: ModelConfig, dtype: str) -> dict:
    """config.json for `cfg` as transformers and vLLM read it (legacy `rope_theta` /
    `rope_scaling` keys: transformers 4.x reads them, 5.x converts them)."""
    if cfg.architecture not in _HF_ARCH:
        raise ValueError(f"architecture {cfg.architecture!r} has no Hugging Face export")
    arch, model_type = _HF_ARCH[cfg.architecture]
    out: dict = {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": _f32(cfg.rms_norm_eps),
        "rope_theta": _f32(cfg.rope_theta),
        "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling else None,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": dtype,
    }
    if cfg.architecture in ("llama", "qwen3"):
        out["attention_bias"] = cfg.attention_bias
    if cfg.architecture == "llama":
        out.update(mlp_bias=False, pretraining_tp=1)
    if cfg.architecture in ("mistral", "qwen2", "qwen3"):
        out["sliding_window"] = None
    if cfg.architecture in ("qwen2", "qwen3"):
        out["use_sliding_window"] = False
    if cfg.bos_token_id is not None:
        out["bos_token_id"] = cfg.bos_token_id
    if cfg.eos_token_ids:  # a list, as Llama 3's, when several ids end generation
        eos = list(cfg.eos_token_ids)
        out["eos_token_id"] = eos if len(eos) > 1 else eos[0]
    return out


def _hf_tensor_name(name: str) -> str:
    """Our loader's names drop transformers' `model.` prefix; put it back (not on lm_head)."""
    return name if name.startswith("lm_head.") else "model." + name


def _save_safetensors(tensors: dict[str, torch.Tensor], out: Path,
                      max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json
    when the weights exceed one shard. Returns the file names written."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        t = tensors[name]
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    meta = {"format": "pt"}  # transformers refuses safetensors files without it
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata=meta)
        _readable(out / "model.safetensors")
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(names, shards):
        save_file(shard, str(out / fname), metadata=meta)
        _readable(out / fname)
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names + ["model.safetensors.index.json"]


def _readable(path: Path) -> None:
    """safetensors creates its files 0600; give them the mode any new file gets here (umask),
    so a server running as another user (a container) can read the export."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def export_checkpoint(ck, out: str | Path, dtype: str = "float32", force: bool = False,
                      max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write `ck` (a LoadedCheckpoint) as a Hugging Face folder at `out`."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    out = Path(out)
    _prepare_out(out, force, _MODEL_FILES, ("model-*-of-*.safetensors",))
    cfg, tok = ck.config, ck.tokenizer
    td = _DTYPES[dtype]
    tensors = {}
    for name, t in ck.tensors.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # tied: transformers and vLLM take the embedding
        tensors[_hf_tensor_name(name)] = t.detach().to(td).contiguous().cpu()
    _save_safetensors(tensors, out, max_shard_bytes)
    _write_json(out / "config.json", hf_config_dict(cfg, dtype))

    tok.backend.save(str(out / "tokenizer.json"))
    eos_ids = list(tok.eos_token_ids)
    tc: dict = {
        # The backend as is (tokenizer.json holds its post-processor, so BOS/EOS insertion
        # is the GGUF's): no model-specific tokenizer class re-deriving anything.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "model_max_length": cfg.max_position_embeddings,
    }
    if tok.bos_token_id is not None:
        tc["bos_token"] = tok.id_to_token(tok.bos_token_id)
    if eos_ids:
        tc["eos_token"] = tok.id_to_token(eos_ids[0])
    if tok.chat_template:
        tc["chat_template"] = tok.chat_template
    _write_json(out / "tokenizer_config.json", tc)

    gen: dict = {}
    if tok.bos_token_id is not None:
        gen["bos_token_id"] = tok.bos_token_id
    if eos_ids:  # every id the engine stops on (the declared EOS first)
        gen["eos_token_id"] = eos_ids if len(eos_ids) > 1 else eos_ids[0]
    _write_json(out / "generation_config.json", gen)
    return out


def export_model(model: str | None, out: str | Path, dtype: str = "float32",
                 force: bool = False) -> Path:
    """Load `model` (GGUF file, HF folder; None: the embedded default) and export it."""
    from ..model.checkpoint import load_checkpoint

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    _check_out(Path(out), force)
    return export_checkpoint(load_checkpoint(model, _DTYPES[dtype]), out, dtype, force)


# -- export-heads --vllm-medusa --------------------------------------------------------------
def vllm_medusa_tensors(heads, unembed: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The project's MedusaHeads as vLLM's Medusa module names them.

    Layout followed (vLLM, vllm/model_executor/models/medusa.py, class Medusa and
    ResidualBlock; vllm-project/vllm at 09cddad8f032):

        class ResidualBlock:
            self.layers = nn.ModuleList([nn.Linear(hidden_size, hidden_size,
                            bias=getattr(config, "medusa_fc_bias", False)) ...])
            def forward(self, x):
                for layer in self.layers:
                    x = x + self.act(layer(x))          # act = nn.SiLU()
        class Medusa:
            self.blocks = nn.ModuleList([ResidualBlock(config=config,
                            hidden_size=self.config.hidden_size,
                            num_layers=self.config.num_hidden_layers)
                            for _ in range(self.config.num_heads)])
            if getattr(config, "original_lm_head", False):
                self.lm_head = ParallelLMHead(self.unpadded_vocab_size, ...)
                self.lm_heads = [self.lm_head for _ in range(self.config.num_heads)]
            else:
                self.lm_heads = nn.ModuleList([ParallelLMHead(...) ...])
          load_weights:
            name = name.replace("medusa_heads.", "")
            if name == "token_map":
                if self.truncated_vocab_size < self.orig_vocab_size:
                    self.token_map = nn.Parameter(loaded_weight, requires_grad=False)
            elif name in params_dict: weights_map[name] = loaded_weight
            elif (getattr(self.config, "original_lm_head", False)
                  and name == "lm_heads.0.weight"):
                weights_map["lm_head.weight"] = loaded_weight
            ...
            if "lm_head" in name and self.token_map is not None and
                loaded_weight.shape[0] > self.token_map.shape[0]:
                loaded_weight = loaded_weight[self.token_map]
          compute_logits: logits of the truncated vocab scattered into a -inf row of
            orig_vocab_size at `logits[..., self.token_map]`.

    So our `blocks.{i}.{j}.linear.{weight,bias}` (ResBlock: h + SiLU(W h + b), the same
    formula) becomes `blocks.{i}.layers.{j}.{weight,bias}` with medusa_fc_bias true. vLLM's
    drafter (vllm/v1/spec_decode/medusa.py, MedusaProposer.load_model) loads only this
    checkpoint and does NOT take the target model's lm_head, so a shared unembedding is
    written once as `lm_heads.0.weight` with original_lm_head true (the one name its loader
    maps to the shared `lm_head`; copies for other heads would be ignored). Heads with
    their own unembedding write `lm_heads.{i}.weight`. A draft vocabulary becomes vLLM's
    `token_map` (the sorted token ids) with truncated_vocab_size = its length, and the
    unembedding rows are written already sliced to it (what load_weights would do).
    """
    draft_vocab = getattr(heads, "draft_vocab", None)  # optional FR-Spec draft vocabulary
    tensors: dict[str, torch.Tensor] = {}
    for i, block in enumerate(heads.blocks):
        for j, res in enumerate(block):
            tensors[f"blocks.{i}.layers.{j}.weight"] = res.linear.weight
            if res.linear.bias is None:
                raise ValueError("heads without residual-block biases are not supported")
            tensors[f"blocks.{i}.layers.{j}.bias"] = res.linear.bias
    if heads.lm_heads is None:
        if unembed is None:
            raise ValueError("heads share the base unembedding: the base model's is needed")
        if tuple(unembed.shape) != (heads.vocab_size, heads.blocks[0][0].linear.in_features):
            raise ValueError(f"base unembedding has shape {list(unembed.shape)}, the heads "
                             f"need [{heads.vocab_size}, {heads.blocks[0][0].linear.in_features}]")
        unembeds = {"lm_heads.0.weight": unembed}
    else:
        unembeds = {f"lm_heads.{i}.weight": lm.weight for i, lm in enumerate(heads.lm_heads)}
    full = draft_vocab is None or draft_vocab.numel() == heads.vocab_size
    for name, w in unembeds.items():
        tensors[name] = w if full else w.index_select(0, draft_vocab.to(w.device))
    if not full:
        tensors["token_map"] = draft_vocab
    return tensors


def vllm_medusa_config(heads, base: ModelConfig, dtype: str) -> dict:
    """config.json for vLLM's MedusaConfig (vllm/transformers_utils/configs/medusa.py:
    model_type "medusa"; __init__(hidden_size, vocab_size, num_heads, num_hidden_layers,
    max_paths, topk, truncated_vocab_size=None -> vocab_size); its from_pretrained renames
    every key containing "num" and "heads" to num_heads and "num" and "layers" to
    num_hidden_layers, so no other key here may contain those words)."""
    draft_vocab = getattr(heads, "draft_vocab", None)
    truncated = base.vocab_size if draft_vocab is None else int(draft_vocab.numel())
    return {
        "model_type": "medusa",
        "architectures": ["MedusaModel"],  # vLLM registry: "MedusaModel": ("medusa", "Medusa")
        "hidden_size": base.hidden_size,
        "vocab_size": base.vocab_size,
        "num_heads": heads.num_heads,
        "num_hidden_layers": heads.num_layers,
        "truncated_vocab_size": truncated,
        "original_lm_head": heads.lm_heads is None,
        "medusa_fc_bias": True,
        "torch_dtype": dtype,
        "mtpserve_export": {  # provenance only; vLLM ignores it
            "base_fingerprint": base.fingerprint(),
            "draft_vocab": draft_vocab is not None,
            "note": "vLLM drafts a chain of each head's top-1 token; "
                    "num_speculative_tokens must not exceed num_heads",
        },
    }


def export_heads_vllm(heads, base: ModelConfig, unembed: torch.Tensor | None, out: str | Path,
                      dtype: str = "float32", force: bool = False) -> Path:
    """Write `heads` (MedusaHeads for `base`) as a vLLM Medusa checkpoint folder."""
    from safetensors.torch import save_file

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    out = Path(out)
    _prepare_out(out, force, ("config.json", "model.safetensors"), ())
    td = _DTYPES[dtype]
    with torch.no_grad():
        tensors = {k: (v if k == "token_map" else v.to(td)).detach().contiguous().cpu()
                   for k, v in vllm_medusa_tensors(heads, unembed).items()}
    if "token_map" in tensors:
        tensors["token_map"] = tensors["token_map"].to(torch.int64)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    _readable(out / "model.safetensors")
    _write_json(out / "config.json", vllm_medusa_config(heads, base, dtype))
    return out


# -- command line ---------------------------------------------------------------------------
def _run_export_model(a: argparse.Namespace) -> int:
    try:
        out = export_model(a.model, a.out, a.dtype, a.force)
    except ValueError as exc:
        print(f"mtpserve export-model: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({a.dtype})")
    return 0


def _run_export_heads(a: argparse.Namespace) -> int:
    from ..model.checkpoint import load_checkpoint
    from ..spec.heads import MedusaHeads
    from ..spec.heads_io import load_heads

    try:
        _check_out(Path(a.out), a.force)
        ck = load_checkpoint(a.model)
        heads = load_heads(a.heads, ck.config)
        if not isinstance(heads, MedusaHeads):  # vLLM's Medusa format is the only target here
            raise ValueError(f"{a.heads}: export-heads converts Medusa heads only, these are "
                             f"{getattr(heads, 'kind', type(heads).__name__)} heads")
        if a.full_vocabulary:
            heads.set_draft_vocab(None)  # the same greedy output, drafted over every token
        unembed = None
        if heads.lm_heads is None:  # the base model's unembedding, tied or not
            unembed = ck.tensors["embed_tokens.weight" if ck.config.tie_word_embeddings
                                 else "lm_head.weight"]
        out = export_heads_vllm(heads, ck.config, unembed, a.out, a.dtype, a.force)
    except ValueError as exc:
        print(f"mtpserve export-heads: {exc}", file=sys.stderr)
        return 2
    dv = getattr(heads, "draft_vocab", None)
    print(f"wrote {out}: {heads.num_heads} heads x {heads.num_layers} layers, "
          f"{'shared' if heads.lm_heads is None else 'own'} unembedding"
          + (f", draft vocabulary {dv.numel()} (token_map)" if dv is not None else ""))
    print(f"serve: vllm serve MODEL_DIR --speculative-config "
          f"'{{\"method\": \"medusa\", \"model\": \"{out}\", "
          f"\"num_speculative_tokens\": {heads.num_heads}}}'")
    return 0


def add_export_commands(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("export-model", help="write a Hugging Face folder (config, safetensors, "
                                            "tokenizer) from a GGUF file, for transformers/vLLM")
    m.add_argument("--model", default=None,
                   help="GGUF file or Hugging Face folder (default: embedded SmolLM2-135M-Instruct)")
    m.add_argument("--out", required=True, help="output folder (created; must be empty)")
    m.add_argument("--dtype", default="float32", choices=list(_DTYPES),
                   help="weight dtype (default float32: GGUF blocks dequantized exactly)")
    m.add_argument("--force", action="store_true", help="overwrite files in a non-empty --out")
    m.set_defaults(func=_run_export_model)

    h = sub.add_parser("export-heads", help="convert draft heads for another engine "
                                            "(vllm-medusa: vLLM's Medusa drafter checkpoint)")
    h.add_argument("--heads", required=True, help="heads folder (mtpserve or Medusa layout)")
    h.add_argument("--format", default="vllm-medusa", choices=["vllm-medusa"])
    h.add_argument("--model", default=None,
                   help="base model the heads belong to (default: embedded SmolLM2); its "
                        "unembedding is written for heads that share it")
    h.add_argument("--out", required=True, help="output folder (created; must be empty)")
    h.add_argument("--dtype", default="float32", choices=list(_DTYPES), help="weight dtype")
    h.add_argument("--full-vocabulary", action="store_true",
                   help="drop the heads' draft vocabulary (no token_map): vLLM 0.32's Medusa "
                        "loader refuses checkpoints that have one")
    h.add_argument("--force", action="store_true", help="overwrite files in a non-empty --out")
    h.set_defaults(func=_run_export_heads)

