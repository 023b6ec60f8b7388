"""Filling a CausalLM (trunk.py) from Hugging Face-named tensors: names and shapes checked
strictly, every problem reported at once, q/k/v and gate/up fused at load time for fewer,
larger matmuls. `load_decoder_layer` is shared with the MTP heads, whose extra blocks are
ordinary decoder layers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..config import ModelConfig
    from .trunk import CausalLM, DecoderLayer


@torch.no_grad()
def load_trunk_weights(model: CausalLM, tensors: dict[str, torch.Tensor]) -> None:
    """Assign HF-named tensors to `model`, fusing q/k/v and gate/up. Strict: names and
    shapes. Empties `tensors` as it goes (pass a copy to keep them).

    Raises ValueError naming every missing, unexpected or mis-shaped tensor.
    """
    cfg = model.config
    remaining = tensors  # consumed: each tensor is dropped once copied
    problems: list[str] = []

    def take(name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
        t = remaining.pop(name, None)
        if t is None:
            problems.append(f"missing tensor {name} (expected shape {list(shape)})")
            return None
        if tuple(t.shape) != shape:
            problems.append(f"tensor {name} has shape {list(t.shape)}, expected {list(shape)}")
            return None
        return t

    def put(param: torch.Tensor, value: torch.Tensor | None) -> None:
        if value is not None:
            param.copy_(value.to(param.dtype))

    H = cfg.hidden_size
    put(model.embed_tokens.weight, take("embed_tokens.weight", (cfg.vocab_size, H)))
    put(model.norm.weight, take("norm.weight", (H,)))
    if model.lm_head is not None:
        put(model.lm_head.weight, take("lm_head.weight", (cfg.vocab_size, H)))
    else:
        remaining.pop("lm_head.weight", None)  # some tied checkpoints still store it
    for i, layer in enumerate(model.layers):
        load_decoder_layer(layer, cfg, take, f"layers.{i}.")
    ignorable = ("rotary_emb.inv_freq",)
    for name in sorted(remaining):
        if not name.endswith(ignorable):
            problems.append(f"unexpected tensor {name}")
    if problems:
        shown = "; ".join(problems[:8])
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise ValueError(f"checkpoint does not fit the model config: {shown}{more}")


@torch.no_grad()
def load_decoder_layer(layer: DecoderLayer, cfg: ModelConfig,
                       take: Callable[[str, tuple[int, ...]], torch.Tensor | None], p: str) -> None:
    """Fill one DecoderLayer from HF-named tensors `p + "self_attn.q_proj.weight"`, ...,
    fusing q/k/v and gate/up. `take(name, shape)` returns the tensor, or None after
    recording it as missing / mis-shaped (the caller reports). Shared with the MTP heads,
    whose extra blocks are ordinary decoder layers."""
    def put(param: torch.Tensor, value: torch.Tensor | None) -> None:
        if value is not None:
            param.copy_(value.to(param.dtype))

    H, D = cfg.hidden_size, cfg.head_dim
    qs, kvs = cfg.num_heads * D, cfg.num_kv_heads * D
    att = layer.self_attn
    q = take(p + "self_attn.q_proj.weight", (qs, H))
    k = take(p + "self_attn.k_proj.weight", (kvs, H))
    v = take(p + "self_attn.v_proj.weight", (kvs, H))
    if q is not None and k is not None and v is not None:
        att.qkv_proj.set_weight(torch.cat([q, k, v], 0))
    if cfg.attention_bias:
        bq = take(p + "self_attn.q_proj.bias", (qs,))
        bk = take(p + "self_attn.k_proj.bias", (kvs,))
        bv = take(p + "self_attn.v_proj.bias", (kvs,))
        if bq is not None and bk is not None and bv is not None:
            att.qkv_proj.set_bias(torch.cat([bq, bk, bv], 0))
    o = take(p + "self_attn.o_proj.weight", (H, qs))
    if o is not None:
        att.o_proj.set_weight(o)
    if cfg.qk_norm:
        put(att.q_norm.weight, take(p + "self_attn.q_norm.weight", (D,)))
        put(att.k_norm.weight, take(p + "self_attn.k_norm.weight", (D,)))
    put(layer.input_layernorm.weight, take(p + "input_layernorm.weight", (H,)))
    put(layer.post_attention_layernorm.weight, take(p + "post_attention_layernorm.weight", (H,)))
    g = take(p + "mlp.gate_proj.weight", (cfg.intermediate_size, H))
    u = take(p + "mlp.up_proj.weight", (cfg.intermediate_size, H))
    if g is not None and u is not None:
        layer.mlp.gate_up_proj.set_weight(torch.cat([g, u], 0))
    d = take(p + "mlp.down_proj.weight", (H, cfg.intermediate_size))
    if d is not None:
        layer.mlp.down_proj.set_weight(d)
