"""Llama-family trunk written for this engine (Llama, Mistral, Qwen2/3, SmolLM).

`forward(ids, meta, kv) -> hidden` runs every new token of every scheduled sequence as
one packed batch: linear layers see [T, H] with no padding; only attention pads per
sequence. `compute_logits(hidden)` is separate so draft heads can share the unembedding.
Parameter names follow Hugging Face's (`layers.N.self_attn.q_proj.weight`, ...); q/k/v and
gate/up are fused at load time for fewer, larger matmuls (trunk_weights.py fills a model).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .attention import write_and_attend
from .row_attention import resolve as resolve_attention_kernel
from .attention_metadata import AttentionMetadata
from .kv_cache import KVCache
from .int4_format import resolve_int4_kernel
from .linear import (WIDE_ROWS, ChunkRows, Linear, chunk_rows, fp16_linear, onednn_linear,
                     pack_for_onednn, pack_fp16, row_invariant)
from . import q8_unembed
from . import step_attention  # also defines torch.ops.mtpserve.cached_attention


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # one fused op, same bits
        # Normalise in fp32 like the reference implementations, cast back after scaling.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies, with llama3 / linear scaling applied."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    sc = cfg.rope_scaling or {}
    kind = sc.get("rope_type", sc.get("type"))
    if kind == "linear":
        inv = inv / float(sc["factor"])
    elif kind == "llama3":
        factor = float(sc["factor"])
        low = float(sc.get("low_freq_factor", 1.0))
        high = float(sc.get("high_freq_factor", 4.0))
        old_len = float(sc.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv
        low_wl, high_wl = old_len / low, old_len / high
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > low_wl, inv / factor, inv)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen <= low_wl) & (wavelen >= high_wl)
        inv = torch.where(is_mid, mid, scaled)
    return inv


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position, indexed by the (arbitrary) positions of a step."""

    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        inv = rope_inv_freq(cfg)
        t = torch.arange(max_positions, dtype=torch.float64)
        freqs = torch.outer(t, inv)
        self.register_buffer("cos", freqs.cos().float(), persistent=False)
        self.register_buffer("sin", freqs.sin().float(), persistent=False)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, D/2] for a step's positions: looked up once, used by every layer."""
        return (self.cos[positions].unsqueeze(1).to(dtype),
                self.sin[positions].unsqueeze(1).to(dtype))

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, head_dim]. Rotate-half convention (HF)."""
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        q_size = cfg.num_heads * cfg.head_dim
        kv_size = cfg.num_kv_heads * cfg.head_dim
        self.split = (q_size, kv_size, kv_size)
        self.qkv_proj = Linear(cfg.hidden_size, q_size + 2 * kv_size, bias=cfg.attention_bias)
        self.o_proj = Linear(q_size, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.scale = cfg.head_dim ** -0.5
        self.batch_invariant = False  # see CausalLM.set_batch_invariant
        self.row_kernel = False  # see CausalLM.set_attention_kernel

    def forward(self, x: torch.Tensor, rot: tuple[torch.Tensor, torch.Tensor],
                meta: AttentionMetadata | None, kv: KVCache | None) -> torch.Tensor:
        """meta/kv None: the compiled forward's path, where the write + attention is one
        op reading the step's metadata (step_attention.py)."""
        T = x.shape[0]
        qkv = self.qkv_proj(x)
        q_size, kv_size, _ = self.split
        v = qkv[:, q_size + kv_size:].view(T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(qkv[:, :q_size].view(T, self.num_heads, self.head_dim))
            k = self.k_norm(qkv[:, q_size:q_size + kv_size].view(T, self.num_kv_heads,
                                                                  self.head_dim))
            q, k = RotaryEmbedding.apply(q, *rot), RotaryEmbedding.apply(k, *rot)
        else:  # q and k heads side by side: rotate them in one go
            qk = qkv[:, :q_size + kv_size].view(T, self.num_heads + self.num_kv_heads,
                                                self.head_dim)
            q, k = RotaryEmbedding.apply(qk, *rot).split([self.num_heads, self.num_kv_heads], 1)
        if kv is None:  # compiled: step_context carries batch_invariant and the row kernel
            out = step_attention.attention_op(self.row_kernel)(q, k, v, self.layer_idx,
                                                               self.scale)
        else:
            out = write_and_attend(q, k, v, kv, self.layer_idx, meta, self.scale,
                                   self.batch_invariant, self.row_kernel)
        return self.o_proj(out.reshape(T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.inter, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rot: tuple[torch.Tensor, torch.Tensor],
                meta: AttentionMetadata | None, kv: KVCache | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rot, meta, kv)
        return x + self.mlp(self.post_attention_layernorm(x))


class CausalLM(nn.Module):
    """The trunk plus final norm and unembedding (tied or not)."""

    def __init__(self, cfg: ModelConfig, max_positions: int | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rope = RotaryEmbedding(cfg, max_positions or cfg.max_position_embeddings)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size,
                                                                   bias=False)
        self.unembed_t: torch.Tensor | None = None  # see use_transposed_weights
        self.unembed_packed: torch.Tensor | None = None  # oneDNN layout, ditto
        self.unembed_fp16: torch.Tensor | None = None  # see use_fp16_unembedding
        self.unembed_q8: torch.Tensor | None = None  # see use_q8_unembedding
        self.batch_invariant = False  # see set_batch_invariant
        self.int4_kernel = "aten"  # the int4 layers' CPU kernel, see quantize
        self.attention_kernel = "sdpa"  # decode/tree rows' attention, see set_attention_kernel

    def forward(self, ids: torch.Tensor, meta: AttentionMetadata, kv: KVCache,
                return_pre_last: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """ids: [T] packed new tokens -> final-normed hidden [T, H].

        With return_pre_last also the residual stream entering the last layer, which
        Meta-style parallel MTP heads read.
        """
        if not self.batch_invariant:
            return self.run_layers(ids, meta.positions, meta, kv, return_pre_last)
        with chunk_rows(self.chunk_plan(meta, ids.shape[0])):
            return self.run_layers(ids, meta.positions, meta, kv, return_pre_last)

    @staticmethod
    def chunk_plan(meta: AttentionMetadata, rows: int) -> ChunkRows | None:
        """Batch-invariant mode: the prefill chunks of WIDE_ROWS+ rows of this pass, which
        quantized layers multiply alone by their bf16 wide copy (linear.ChunkRows: a chunk's
        rows depend only on the chunk, whatever else the pass holds); None: none."""
        if meta.groups is None:
            return ChunkRows((slice(None),), None) if meta.chunk and rows >= WIDE_ROWS else None
        chunks = [g for g in meta.groups if g.chunk and g.rows.numel() >= WIDE_ROWS]
        if not chunks:
            return None
        others = [g.rows for g in meta.groups if not any(g is c for c in chunks)]
        return ChunkRows(tuple(g.rows for g in chunks), torch.cat(others) if others else None)

    def run_layers(self, ids: torch.Tensor, positions: torch.Tensor,
                   meta: AttentionMetadata | None, kv: KVCache | None,
                   return_pre_last: bool = False
                   ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """forward's body; meta and kv None inside the compiled forward (compiled.py), whose
        graph sees only ids and positions."""
        x = self.embed_tokens(ids)
        rot = self.rope.tables(positions, x.dtype)
        pre_last = x
        for i, layer in enumerate(self.layers):
            if i == len(self.layers) - 1:
                pre_last = x
            x = layer(x, rot, meta, kv)
        h = self.norm(x)
        return (h, pre_last) if return_pre_last else h

    @torch.no_grad()
    def quantize(self, trunk: str, wide_copy: bool = False, int4_kernel: str = "aten") -> None:
        """Weight-only int8 or int4 for every projection of every layer. The unembedding
        stays dense: the kernels' bf16 outputs would round logits to ~0.1 at this scale,
        which makes ties of what should be clear choices. wide_copy: keep bf16 copies of
        the quantized values for passes of many rows (prefill, big verify batches).
        int4_kernel: int4_format.INT4_KERNELS (draft modules quantized later follow it)."""
        if trunk == "int4":
            int4_kernel = resolve_int4_kernel(int4_kernel, self.norm.weight.device)
            self.int4_kernel = int4_kernel
        for m in self.layers.modules():
            if isinstance(m, Linear):
                if trunk == "int4":
                    m.quantize_int4(wide_copy=wide_copy, kernel=int4_kernel)
                else:
                    m.quantize_int8(wide_copy=wide_copy)

    def set_attention_kernel(self, name: str, kv_dtype: torch.dtype) -> str:
        """EngineConfig.attention_kernel for a KV cache in `kv_dtype` on this model's device
        -> 'rows' (row_attention.attend_rows for decode and tree rows) or 'sdpa'."""
        self.attention_kernel = resolve_attention_kernel(name, self.norm.weight.device, kv_dtype)
        for layer in self.layers:
            layer.self_attn.row_kernel = self.attention_kernel == "rows"
        return self.attention_kernel

    @torch.no_grad()
    def set_batch_invariant(self, on: bool) -> list[str]:
        """Batch-invariant mode (EngineConfig.batch_invariant): a row's hidden state and
        logits do not depend on the other rows of the pass. Attention takes
        attend_invariant; every projection's kernel and the unembedding are checked
        against the row-invariance rule (linear.row_invariant). Returns the names of the
        kernels that fail it (empty: the guarantee holds on this machine)."""
        failing = []
        self.batch_invariant = on
        for layer in self.layers:
            layer.self_attn.batch_invariant = on
        if not on:
            return failing
        # the rule is the kernel's at a shape (Linear.kernel_kind), whatever the values:
        # checked once per kind (4 kinds, not 120 layers: 0.7 s of a start)
        checked: dict[tuple, bool] = {}
        for name, m in self.layers.named_modules():
            if not isinstance(m, Linear):
                continue
            kind = m.kernel_kind()
            ok = m.set_row_invariant(check=kind not in checked)
            checked.setdefault(kind, ok)
            if not checked[kind]:
                failing.append(f"layers.{name} ({m.weight_format})")
        h = self.unembed_weight().shape[1]
        if not row_invariant(self.compute_logits, h, self.norm.weight.dtype,
                             self.norm.weight.device):
            failing.append("unembedding")
        return failing

    @property
    def weight_format(self) -> str:
        """dense, int8 or int4: how the layers' projections are stored."""
        return self.layers[0].mlp.down_proj.weight_format

    @property
    def unembed_format(self) -> str:
        """q8 (use_q8_unembedding), fp16 (use_fp16_unembedding) or dense: how
        compute_logits reads the unembedding."""
        if self.unembed_q8 is not None:
            return "q8"
        return "fp16" if self.unembed_fp16 is not None else "dense"

    @torch.no_grad()
    def use_fp16_unembedding(self) -> bool:
        """CPU: compute the logits from an fp16 copy of the fp32 unembedding through FBGEMM's
        fp16 GEMM (fp32 in, fp32 accumulation and out), and hold no fp32 copy for the logits
        (the tied embedding keeps its fp32 rows for the lookup and draft vocabularies). Half
        the bytes per step (held: ~96 MB for this model's 113 MB fp32 copy, FBGEMM's
        padding); logits within ~0.02 of fp32 dense here, where per-channel int8 weights
        (the only int8 layout with fp32-output kernels here) were 0.9 off and bf16 outputs
        0.2 (benchmarks/unembed_kernels.py). A pass of one row and a pass of many
        give each row the same bits. False (nothing changed) where the op is missing or
        disagrees with the fp16 values on a probe."""
        w = self.unembed_weight()
        if w.dtype != torch.float32:
            return False
        packed = pack_fp16(w)
        if packed is None:
            return False
        probe = torch.randn(3, w.shape[1], generator=torch.Generator().manual_seed(0)).to(w.device)
        got = fp16_linear(probe, packed)
        for rows in torch.arange(w.shape[0], device=w.device).split(8192):  # small temporaries
            want = F.linear(probe, w[rows].half().float())
            err = float((got[:, rows] - want).abs().max())
            if not err <= 1e-3 * (1 + float(want.abs().max())):  # NaN fails too
                return False
        self.unembed_fp16 = packed
        self.unembed_packed = self.unembed_t = None
        return True

    @torch.no_grad()
    def use_q8_unembedding(self) -> bool:
        """CPU: compute the logits from the unembedding's own GGUF Q8_0 blocks (int8 values,
        one fp16 scale per 32) through q8_unembed's kernel: exactly the file's weights (the
        fp16 copy rounds them), fp32 in and out, the activations quantized inside to int16
        per block of 32 for exact integer dots (logits ~2e-3 off the fp32 product here, the
        fp16 copy's ~0.02), 1.06 bytes per weight, and no fp32 copy held for the logits (the
        tied embedding keeps its fp32 rows for the lookup and draft vocabularies). A row's
        logits are the same bits alone or among many rows. False (nothing changed) where
        the kernel does not run here or the fp32 values are not exactly a Q8_0 tensor's
        (q8_unembed.recover)."""
        w = self.unembed_weight()
        if w.device.type != "cpu" or w.dtype != torch.float32 or not q8_unembed.available():
            return False
        blocks = q8_unembed.recover(w)
        if blocks is None:
            return False
        self.unembed_q8 = q8_unembed.pack(*blocks)
        self.unembed_fp16 = self.unembed_packed = self.unembed_t = None
        return True

    def unembed_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    @torch.no_grad()
    def use_transposed_weights(self) -> None:
        """CPU decode: dense trunk projections in oneDNN's packed layout (Linear.
        transpose_storage), and one extra copy of the unembedding for the logits: fp32
        prepacked for oneDNN (every row count; one row 5.1 vs 6.0 ms for the [H, V] copy it
        replaced), else (bf16, or a build without the ops) an [H, V] copy for the one-row
        logits of plain decode, with W @ h^T from the [V, H] original for 2+ rows, which
        BLAS streams faster than h @ W^T there (docs/benchmarks.md). Quantized projections
        keep their packed layout."""
        for m in self.layers.modules():
            if isinstance(m, Linear):
                m.transpose_storage()
        if self.unembed_fp16 is not None or self.unembed_q8 is not None:  # their own copy
            return
        w = self.unembed_weight()
        if w.dtype == torch.float32:
            self.unembed_packed = pack_for_onednn(w, batch_hint=16)
        if self.unembed_packed is None:
            self.unembed_t = w.t().contiguous()

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, H] -> float32 logits [N, V]."""
        if self.unembed_q8 is not None:
            return q8_unembed.mm(hidden, self.unembed_q8, self.config.vocab_size)
        if self.unembed_fp16 is not None:
            return fp16_linear(hidden, self.unembed_fp16)
        if self.unembed_packed is not None and hidden.dtype == torch.float32:
            return onednn_linear(hidden, self.unembed_packed)
        if self.unembed_t is not None or self.unembed_packed is not None:  # CPU layouts
            if self.unembed_t is not None and hidden.shape[0] == 1:
                return torch.matmul(hidden, self.unembed_t).float()
            return torch.mm(self.unembed_weight(), hidden.t()).t().float()
        if self.lm_head is not None:
            return self.lm_head(hidden).float()
        return F.linear(hidden, self.embed_tokens.weight).float()
