"""Meta-style parallel multi-token prediction heads (Gloeckle et al., arXiv 2404.19737).

The reference release (facebookresearch "multi-token-prediction", llama code) computes
h_trunk = the residual stream after layers[:-1]; head 0 is the last layer (the ordinary
next-token head, our verifier) and extra head i is a full transformer block applied to
h_trunk, followed by the SHARED final norm and unembedding. So `extra_heads[k-1]` is our
head k: read at the last accepted token t, it guesses token t+1+k (t+1 being the
verifier's own bonus token), the same convention as Medusa heads.

Faithful attention: the extra blocks attend over the whole context, as in the reference.
They are extra decoder layers branching off the residual stream entering the last layer,
run in the SAME verify forward as the trunk on every row (prefill chunks and tree nodes,
same tree mask) with their own KV-cache layers after the trunk's, so `keep_path` commits
the accepted path for them too. The engine asks for the pre-last residual only when such
heads are loaded (`branch`), and drafts from the blocks' outputs at the last accepted row.

Checkpoint layout: params.json (`n_future_tokens`, dim, n_layers, n_heads, n_kv_heads,
norm_eps, rope_theta, vocab_size, ...) and consolidated*.pth or *.safetensors holding
`extra_heads.{i}.attention.{wq,wk,wv,wo}.weight`, `extra_heads.{i}.feed_forward.{w1,w2,w3}
.weight`, `extra_heads.{i}.attention_norm.weight`, `extra_heads.{i}.ffn_norm.weight`, next
to the trunk's own tensors (ignored here: the trunk is the base model loaded separately).
Meta's wq/wk rows are in the interleaved-pair rotary layout; they are permuted to the
rotate-half layout our trunk uses (what transformers' convert_llama_weights_to_hf does).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from ..config import ModelConfig
from ..model.attention_metadata import AttentionMetadata
from ..model.kv_cache import KVCache
from ..model.trunk import DecoderLayer
from ..model.trunk_weights import load_decoder_layer
from .mtp_common import TensorTaker, check_field, read_matching

# Meta llama tensor names of one block -> ours (HF names, as DecoderLayer loads them).
_META_TO_HF = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_HF_TO_META = {hf: meta for meta, hf in _META_TO_HF.items()}
_META_TRUNK = ("tok_embeddings.", "layers.", "norm.", "output.", "rope.freqs")


def meta_to_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a Meta wq/wk (rotary pairs interleaved: 0,1 | 2,3 | ...) reordered to the
    rotate-half layout (first halves, then second halves, per head)."""
    dim = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, dim, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


class ParallelMTPHeads(nn.Module):
    kind = "meta-mtp"

    def __init__(self, cfg: ModelConfig, num_heads: int, topk: int = 4,
                 default_tree: str = "tree16") -> None:
        super().__init__()
        self.num_heads = num_heads
        self.topk = topk
        self.default_tree = default_tree
        # KV-cache layers num_layers .. num_layers + n - 1 belong to the extra blocks.
        self.kv_layers = num_heads
        self.blocks = nn.ModuleList(DecoderLayer(cfg, cfg.num_layers + i)
                                    for i in range(num_heads))

    def prepare(self, model: nn.Module | None = None) -> None:
        """Nothing to precompute (same interface as MedusaHeads)."""

    def branch(self, pre_last: torch.Tensor, model: nn.Module, meta: AttentionMetadata,
               kv: KVCache) -> torch.Tensor:
        """pre_last: [T, H] residual entering the trunk's last layer, for every row of the
        step -> [T, n, H] outputs of the extra blocks (before the shared final norm). Runs
        under the step's own metadata and writes each block's K/V in its cache layer."""
        rot = model.rope.tables(meta.positions, pre_last.dtype)
        return torch.stack([blk(pre_last, rot, meta, kv) for blk in self.blocks], dim=1)

    def head_logits(self, feats: torch.Tensor, model: nn.Module,
                    num_heads: int | None = None) -> torch.Tensor:
        """feats: [B, n, H] from `branch` at each sequence's last accepted row -> float32
        logits [n', B, V] of the first n' heads: shared final norm + unembedding."""
        h = feats[:, :num_heads].transpose(0, 1)
        nh, B, H = h.shape
        return model.compute_logits(model.norm(h.reshape(nh * B, H))).view(nh, B, -1)

    def candidates(self, hidden: torch.Tensor, model: nn.Module, last_tokens: list[int],
                   num_heads: int | None = None, positions: list[int] | None = None
                   ) -> list[list[list[int]]]:
        """hidden: [B, n, H] (this layout drafts from `branch`'s rows, not the trunk's)."""
        logits = self.head_logits(hidden, model, num_heads)
        top = logits.topk(min(self.topk, logits.shape[-1]), dim=-1).indices  # [n', B, k]
        return top.transpose(0, 1).tolist()  # one host sync: [B][n'][k]


def _meta_name(ours: str) -> str:
    """extra_heads.{i}.<HF name> -> the name in Meta's checkpoint (for error messages)."""
    parts = ours.split(".", 2)
    if len(parts) == 3 and parts[2] in _HF_TO_META:
        return f"{parts[0]}.{parts[1]}.{_HF_TO_META[parts[2]]}"
    return ours


def is_meta_mtp_folder(folder: Path) -> bool:
    p = folder / "params.json"
    return p.exists() and "n_future_tokens" in p.read_text()


def load_meta_mtp_heads(folder: Path, base: ModelConfig) -> ParallelMTPHeads:
    params_path = folder / "params.json"
    try:
        params = json.loads(params_path.read_text())
        n = int(params["n_future_tokens"]) - 1
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{params_path}: no usable n_future_tokens ({exc!r})") from None
    if n < 1:
        raise ValueError(f"{params_path}: n_future_tokens {n + 1} leaves no extra heads")
    check_field(params_path, params, "dim", base.hidden_size, "hidden size")
    check_field(params_path, params, "n_layers", base.num_layers, "layer count")
    check_field(params_path, params, "n_heads", base.num_heads, "attention head count")
    check_field(params_path, params, "n_kv_heads", base.num_kv_heads, "key/value head count",
                required=False)
    if int(params.get("vocab_size", -1)) > 0:  # Meta leaves -1 for "from the tokenizer"
        check_field(params_path, params, "vocab_size", base.vocab_size, "vocabulary size")
    if "rope_theta" in params and float(params["rope_theta"]) != base.rope_theta:
        raise ValueError(f"{params_path}: rope_theta is {params['rope_theta']}, but the base "
                         f"model's is {base.rope_theta}")
    if base.attention_bias or base.qk_norm:
        raise ValueError(f"{params_path}: Meta-style heads are Llama blocks; the base model "
                         f"({base.architecture}) has q/k/v biases or q/k norms")
    files = sorted(folder.glob("consolidated*.pth")) + sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder}: no consolidated*.pth or *.safetensors next to params.json")
    if len([f for f in files if f.suffix == ".pth"]) > 1:
        raise ValueError(f"{folder}: model-parallel shards (several consolidated.*.pth) are "
                         f"not supported; merge them into one file first")
    where = files[0] if len(files) == 1 else folder
    raw = read_matching(files, lambda k: not k.startswith(_META_TRUNK))
    cfg = dataclasses.replace(base, rms_norm_eps=float(params.get("norm_eps",
                                                                  base.rms_norm_eps)))
    heads = ParallelMTPHeads(cfg, n)
    ours: dict[str, torch.Tensor] = {}
    for key, t in raw.items():
        parts = key.split(".", 2)
        hf = _META_TO_HF.get(parts[2]) if len(parts) == 3 and parts[0] == "extra_heads" else None
        if hf is None or not parts[1].isdigit():
            ours[key] = t  # reported as unexpected
            continue
        if parts[2] in ("attention.wq.weight", "attention.wk.weight"):
            nh = base.num_heads if parts[2].endswith("wq.weight") else base.num_kv_heads
            if t.dim() == 2 and t.shape[0] == nh * base.head_dim:
                t = meta_to_rotate_half(t, nh)
        ours[f"extra_heads.{parts[1]}.{hf}"] = t
    take = TensorTaker(ours, where, display=_meta_name)
    for i, blk in enumerate(heads.blocks):
        load_decoder_layer(blk, cfg, take, f"extra_heads.{i}.")
    take.finish()
    return heads
