"""Sequential MTP modules, as in DeepSeek-V3 and Xiaomi MiMo.

Module k keeps the causal chain: h_k = Block(eh_proj(cat[enorm(emb(x_k)), hnorm(h_{k-1})]))
(DeepSeek's order, embedding first, as vLLM's deepseek_mtp.py; MiMo concatenates
[hidden, embedding] and applies its own final norm to h_k), and the logits of depth k come
from the shared final norm + unembedding (a module's own `shared_head` when it has one).
h_0 is the trunk's final-normed hidden state at the last accepted token (what vLLM feeds
its MTP modules) and x_1 the verifier's bonus token; x_{k+1} is the top-1 token of depth k,
so depth d's top-k are computed along the top-1 chain of the shallower depths (a tree
should branch off that chain only: the default tree is a chain). With fewer modules than
the tree is deep, the last module is reused, as vLLM does for DeepSeek's single module.
The next depth takes the module's pre-norm h_k, as vLLM did when this was written; vLLM
0.34's deepseek_mtp passes the post-norm state instead (our shipped module is trained
on the pre-norm chain, so ours stays).
Chain step j sits at rope position p + j (p: the last accepted token's position, the
embedding zeroed at position 0), vLLM's convention.

The project's own format (heads.json `head_type: sequential`, written by `mtpserve
train-heads --head-type sequential`) holds DeepSeek-style modules with their own output
norm, sharing the base embedding and unembedding, optionally with a draft vocabulary.

Checkpoint layout: the model's config.json with `num_nextn_predict_layers` and its
safetensors, module i under `model.layers.{num_hidden_layers + i}.` (DeepSeek: enorm,
hnorm, eh_proj, optional shared_head.{norm,head} and embed_tokens) or `model.mtp_layers.{i}.`
(MiMo: token_layernorm, hidden_layernorm, input_proj, final_layernorm), each plus one
decoder block under HF names (input_layernorm, self_attn.*, post_attention_layernorm, mlp.*).

Attention: in the engine the first module attends over the whole committed context
through its own KV cache (mtp_context.py), as vLLM runs these modules; `candidates()` here
is the chain-only form (the module sees its own draft chain), used by heads trained that way
(project heads with `attention: chain`) and where no context exists (timing drafts).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..model.attention_metadata import AttentionMetadata
from ..model.kv_cache import KVCache
from ..model.linear import Linear
from ..model.trunk import DecoderLayer, RMSNorm
from ..model.trunk_weights import load_decoder_layer
from .draft_vocab import UnembedRows, check_draft_vocab
from .mtp_common import TensorTaker, check_field, put, read_matching, safetensors_files


class ChainKV:
    """The draft chain's keys/values as plain tensors, per module layer: each chain step
    appends its own and attention reads the stack of all of them. No preallocated cache
    and no in-place writes: what autograd (training) and torch.compile (drafting) want."""

    def __init__(self) -> None:
        self.k: dict[int, list[torch.Tensor]] = {}
        self.v: dict[int, list[torch.Tensor]] = {}

    def write(self, layer: int, meta: AttentionMetadata, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k.setdefault(layer, []).append(k)
        self.v.setdefault(layer, []).append(v)

    def keys(self, layer: int, meta: AttentionMetadata) -> torch.Tensor:
        return torch.stack(self.k[layer], 2)  # [B, Hkv, steps, D]

    def values(self, layer: int, meta: AttentionMetadata) -> torch.Tensor:
        return torch.stack(self.v[layer], 2)


class MTPModule(nn.Module):
    """One sequential MTP module: two norms, the input projection, a decoder block, and
    optionally its own output norm / unembedding / embedding (else the base model's)."""

    def __init__(self, cfg: ModelConfig, idx: int, mimo: bool, own_norm: bool,
                 own_head: bool, own_embed: bool) -> None:
        super().__init__()
        H, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.mimo = mimo
        self.enorm, self.hnorm = RMSNorm(H, eps), RMSNorm(H, eps)
        self.eh_proj = nn.Linear(2 * H, H, bias=False)
        self.block = DecoderLayer(cfg, idx)  # idx: its layer in the drafting's own cache
        self.norm = RMSNorm(H, eps) if own_norm else None
        self.head = nn.Linear(H, cfg.vocab_size, bias=False) if own_head else None
        self.embed = nn.Embedding(cfg.vocab_size, H) if own_embed else None

    def step(self, tokens: torch.Tensor, h_prev: torch.Tensor, model: nn.Module,
             meta: AttentionMetadata, kv: KVCache,
             draft_logits: Callable[[torch.Tensor], torch.Tensor] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B], h_prev [B, H] -> (h [B, H] chained to the next depth, float32
        logits [B, V], or [B, V'] from `draft_logits` (the draft vocabulary's rows of the
        unembedding) when one is in use)."""
        x, normed = self.advance(tokens, h_prev, model, meta, kv)
        return x, self.logits(normed, model, draft_logits)

    def logits(self, normed: torch.Tensor, model: nn.Module,
               draft_logits: Callable[[torch.Tensor], torch.Tensor] | None = None
               ) -> torch.Tensor:
        """float32 logits of the normed state: the draft vocabulary's columns when one is
        in use, else the module's own head or the base unembedding."""
        if draft_logits is not None:
            return draft_logits(normed).float()
        if self.head is not None:
            return F.linear(normed, self.head.weight).float()
        return model.compute_logits(normed)

    def advance(self, tokens: torch.Tensor, h_prev: torch.Tensor, model: nn.Module,
                meta: AttentionMetadata, kv: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (h [B, H] for the next depth, the normed state the unembedding reads).
        Differentiable: train-heads runs it with a ChainKV (train_sequential.py)."""
        emb = (model.embed_tokens if self.embed is None else self.embed)(tokens)
        emb = emb * (meta.positions != 0).to(emb.dtype)[:, None]  # vLLM masks position 0
        e, h = self.enorm(emb), self.hnorm(h_prev)
        x = self.eh_proj(torch.cat([h, e] if self.mimo else [e, h], dim=-1))
        x = self.block(x, model.rope.tables(meta.positions, x.dtype), meta, kv)
        if self.mimo:  # MiMo's module output is already final-normed
            x = self.norm(x)
            normed = x
        else:
            normed = (self.norm or model.norm)(x)
        return x, normed


class SequentialMTPHeads(nn.Module):
    kind = "sequential-mtp"

    def __init__(self, cfg: ModelConfig, modules: list[MTPModule], style: str, topk: int = 4,
                 default_tree: str = "chain4", context: bool = True) -> None:
        super().__init__()
        self.mods = nn.ModuleList(modules)
        self.style = style  # "deepseek" or "mimo"
        # True: the first module attends over the committed context (mtp_context.py), as
        # these modules are trained; False: over the draft chain only (heads trained so).
        self.context = context
        self.num_heads = len(modules)
        self.topk = topk
        self.default_tree = default_tree
        self.vocab_size = cfg.vocab_size
        # Sorted token ids drafting scores (None: all); not a weight, saved separately.
        self.register_buffer("draft_vocab", None, persistent=False)
        self._rows = UnembedRows()
        self._int4_rows: Linear | None = None  # see prepare()
        self._quantized = False
        # chain_tops compiled by the engine (compiled_draft.py); None: eager
        self.compiled_chain: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int],
                                      torch.Tensor] | None = None

    # -- the project's own format (train-heads writes it, heads_io.py reads it) ------------
    @classmethod
    def new(cls, cfg: ModelConfig, num_modules: int = 1, default_tree: str = "chain4",
            context: bool = True) -> "SequentialMTPHeads":
        """Untrained DeepSeek-style modules with their own output norm and the base
        unembedding shared (what `train-heads --head-type sequential` trains)."""
        mods = [MTPModule(cfg, i, mimo=False, own_norm=True, own_head=False, own_embed=False)
                for i in range(num_modules)]
        return cls(cfg, mods, "deepseek", default_tree=default_tree, context=context)

    @classmethod
    def from_project_meta(cls, meta: dict, cfg: ModelConfig, default_tree: str
                          ) -> "SequentialMTPHeads":
        """An empty instance shaped as heads.json says (weights are assigned after)."""
        try:
            n = int(meta.get("num_modules", 0))
        except (TypeError, ValueError):
            n = 0
        style = meta.get("style", "deepseek")
        if n < 1 or style not in ("deepseek", "mimo"):
            raise ValueError(f"heads.json: num_modules {n} / style {style!r} is not usable")
        # Heads written before modules could attend over the context were trained on the
        # chain alone; they have no "attention" field.
        attention = meta.get("attention", "chain")
        if attention not in ("chain", "context"):
            raise ValueError(f"heads.json: attention {attention!r} is not 'chain' or 'context'")
        mimo = style == "mimo"
        mods = [MTPModule(cfg, i, mimo=mimo, own_norm=mimo or bool(meta.get("own_norm", True)),
                          own_head=False, own_embed=False) for i in range(n)]
        return cls(cfg, mods, style, default_tree=default_tree, context=attention == "context")

    def project_meta(self) -> dict:
        if any(m.head is not None or m.embed is not None for m in self.mods):
            raise ValueError("the project format shares the base model's embedding and "
                             "unembedding; these modules carry their own")
        return {"head_type": "sequential", "num_modules": len(self.mods), "style": self.style,
                "own_norm": self.mods[0].norm is not None,
                "attention": "context" if self.context else "chain"}

    # -- draft vocabulary (see draft_vocab.py, heads.py) ---------------------------------------
    def set_draft_vocab(self, ids: torch.Tensor | None, where: str = "draft_vocab") -> None:
        self._rows, self._int4_rows = UnembedRows(), None
        if ids is None:
            self.draft_vocab = None
            return
        if any(m.head is not None for m in self.mods):
            raise ValueError(f"{where}: a draft vocabulary needs the shared unembedding")
        ids = check_draft_vocab(ids, self.vocab_size, where)
        self.draft_vocab = ids.to(next(self.parameters()).device)

    def draft_scorer(self, model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """normed state -> logits over the draft vocabulary's rows (None: no draft vocab)."""
        if self.draft_vocab is None:
            return None
        if self._int4_rows is not None:
            n = len(self.draft_vocab)
            return lambda h: self._int4_rows(h)[:, :n]  # drop the kernel's padding rows
        rows = self._rows.get(model.unembed_weight(), self.draft_vocab)
        return lambda h: F.linear(h, rows.to(h.dtype))

    def prepare(self, model: nn.Module | None = None) -> None:
        """Slice the draft vocabulary's rows of the unembedding now, not on the first step.
        Over an int4 trunk on CPU, the modules' projections (eh_proj included) and those
        rows become int4 too: drafting streams ~1/7 of the bytes per depth (about half the
        time per depth here, benchmarks/draft_cost.py), and a draft's rounding can only cost
        acceptance, never change the output (verification decides)."""
        if model is None:
            return
        if getattr(model, "weight_format", "dense") == "int4" and not self._quantized:
            kernel = getattr(model, "int4_kernel", "aten")  # the trunk's (CausalLM.quantize)
            for m in self.mods:
                m.block.apply(lambda mod: mod.quantize_int4(kernel=kernel)
                              if isinstance(mod, Linear) else None)
                # the input projection too: in fp32 it was the largest read of a depth
                m.eh_proj = _int4_linear(m.eh_proj.weight.detach(), kernel)
            if self.draft_vocab is not None:
                self._int4_rows = _int4_linear(
                    self._rows.get(model.unembed_weight(), self.draft_vocab), kernel)
                self._rows = UnembedRows()  # the dense slice (17 MB here) is not read again
            self._quantized = True
        self.draft_scorer(model)

    def candidates(self, hidden: torch.Tensor, model: nn.Module, last_tokens: list[int],
                   num_heads: int | None = None, positions: list[int] | None = None
                   ) -> list[list[list[int]]]:
        """hidden: [B, H] final-normed trunk state at each last accepted token, positions:
        that token's position (default 0) -> per sequence, per depth (num_heads depths,
        default one per module), the top-k tokens. Through `compiled_chain` when the
        engine compiled it (compiled_draft.py), else eagerly: the same `chain_tops`."""
        depth = num_heads or self.num_heads
        dev = hidden.device
        pos0 = torch.tensor(positions if positions is not None else [0] * hidden.shape[0],
                            device=dev)
        tokens = torch.tensor(last_tokens, device=dev)
        if self.compiled_chain is not None:
            tops = self.compiled_chain(hidden, tokens, pos0, depth)
        else:
            tops = self.chain_tops(hidden, tokens, pos0, depth, model)
        return tops.tolist()  # one host sync: [B][depth][k]

    def chain_tops(self, hidden: torch.Tensor, tokens: torch.Tensor, pos0: torch.Tensor,
                   depth: int, model: nn.Module) -> torch.Tensor:
        """The top-1 chain and each depth's top-k, tensors in and out (what compiled_draft.py
        compiles): hidden [B, H], tokens [B] (the bonus tokens), pos0 [B] (the last accepted
        token's position) -> [B, depth, k] token ids. Module m runs at chain step m (the
        last one at every step from it on) and attends over its own steps so far."""
        B = hidden.shape[0]
        rows = torch.arange(B, device=hidden.device)
        kv, last_mod = ChainKV(), len(self.mods) - 1
        draft_logits = self.draft_scorer(model)
        h, tops = hidden, []
        for j in range(depth):
            m = min(j, last_mod)
            meta = AttentionMetadata(
                positions=pos0 + j, token_slots=rows, token_store=rows, seq_slots=rows,
                slot_start=0, kv_len=j - m + 1, num_seqs=B, q_len=1, q_gather=rows,
                q_scatter=rows, mask=None)
            h, logits = self.mods[m].step(tokens, h, model, meta, kv, draft_logits)
            tops.append(self.top_tokens(logits))
            tokens = tops[-1][:, 0]  # the chain continues along the top-1 token
        return torch.stack(tops, dim=1)

    def top_tokens(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, V'] -> [B, k] token ids of the top-k (draft-vocabulary columns mapped back)."""
        top = logits.topk(min(self.topk, logits.shape[-1]), dim=-1).indices
        return top if self.draft_vocab is None else self.draft_vocab[top]


def _int4_linear(weight: torch.Tensor, kernel: str) -> Linear:
    """A bias-free int4 Linear of `weight` [out, in], out padded to a multiple of 16 (the
    packing's unit; callers slice padded outputs off)."""
    n_pad = -weight.shape[0] % 16
    lin = Linear(weight.shape[1], weight.shape[0] + n_pad, bias=False).to(weight.device)
    lin.set_weight(F.pad(weight.float(), (0, 0, 0, n_pad)))
    lin.quantize_int4(kernel=kernel)
    return lin


def is_sequential_mtp_folder(folder: Path) -> bool:
    p = folder / "config.json"
    return p.exists() and "num_nextn_predict_layers" in p.read_text()


_DEEPSEEK = {"enorm": "enorm.weight", "hnorm": "hnorm.weight", "eh_proj": "eh_proj.weight",
             "norm": "shared_head.norm.weight", "head": "shared_head.head.weight"}
_MIMO = {"enorm": "token_layernorm.weight", "hnorm": "hidden_layernorm.weight",
         "eh_proj": "input_proj.weight", "norm": "final_layernorm.weight", "head": None}


def load_sequential_mtp_heads(folder: Path, base: ModelConfig) -> SequentialMTPHeads:
    cfg_path = folder / "config.json"
    try:
        raw = json.loads(cfg_path.read_text())
        n = int(raw["num_nextn_predict_layers"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{cfg_path}: no usable num_nextn_predict_layers ({exc!r})") from None
    if n < 1:
        raise ValueError(f"{cfg_path}: num_nextn_predict_layers is {n}: no MTP modules")
    check_field(cfg_path, raw, "hidden_size", base.hidden_size, "hidden size")
    check_field(cfg_path, raw, "vocab_size", base.vocab_size, "vocabulary size")
    check_field(cfg_path, raw, "num_hidden_layers", base.num_layers, "layer count")
    check_field(cfg_path, raw, "num_attention_heads", base.num_heads, "attention head count",
                required=False)
    check_field(cfg_path, raw, "num_key_value_heads", base.num_kv_heads, "key/value head count",
                required=False)
    files = safetensors_files(folder)
    if not files:
        raise ValueError(f"{folder}: no *.safetensors next to config.json")
    where = files[0] if len(files) == 1 else folder
    L = base.num_layers
    deepseek_layer = re.compile(r"model\.layers\.(\d+)\.")

    def is_mtp(key: str) -> bool:
        if key.startswith("model.mtp_layers."):
            return True
        m = deepseek_layer.match(key)
        return m is not None and int(m.group(1)) >= L

    tensors = read_matching(files, is_mtp)
    mimo = any(k.startswith("model.mtp_layers.") for k in tensors)
    names, style = (_MIMO, "mimo") if mimo else (_DEEPSEEK, "deepseek")
    prefix = (lambda i: f"model.mtp_layers.{i}.") if mimo else (lambda i: f"model.layers.{L + i}.")
    H, V = base.hidden_size, base.vocab_size
    take = TensorTaker(tensors, where)
    modules = []
    for i in range(n):
        p = prefix(i)
        own_norm = mimo or p + names["norm"] in tensors
        own_head = names["head"] is not None and p + names["head"] in tensors
        mod = MTPModule(base, i, mimo, own_norm, own_head, p + "embed_tokens.weight" in tensors)
        put(mod.enorm.weight, take(p + names["enorm"], (H,)))
        put(mod.hnorm.weight, take(p + names["hnorm"], (H,)))
        put(mod.eh_proj.weight, take(p + names["eh_proj"], (H, 2 * H)))
        if mod.norm is not None:
            put(mod.norm.weight, take(p + names["norm"], (H,)))
        if mod.head is not None:
            put(mod.head.weight, take(p + names["head"], (V, H)))
        if mod.embed is not None:
            put(mod.embed.weight, take(p + "embed_tokens.weight", (V, H)))
        load_decoder_layer(mod.block, base, take, p)
        modules.append(mod)
    take.finish()
    return SequentialMTPHeads(base, modules, style)
