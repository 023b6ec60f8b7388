"""The trunk as `--joint` trains it: loaded dense fp32 with plain Parameters, partly
unfrozen, run forward over whole sequences with a KV stand-in autograd can follow, and
exported as a Hugging Face folder once trained.

Why a module of its own: the frozen-trunk modes never move the trunk; this is the one
place that turns the serving model into a trainable one and back (train_joint.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..model.attention_metadata import AttentionMetadata, padded_layout
from ..model.trunk import CausalLM, RotaryEmbedding
from ..model.trunk_weights import load_trunk_weights


def load_trainable(path: str | None, device: torch.device):
    """A dense fp32 CausalLM from a checkpoint (plain [out, in] weights, no transposed or
    quantized storage: gradients need the Parameters themselves) -> (model, checkpoint
    without tensors: config, tokenizer and name, for the export)."""
    from ..model.checkpoint import load_checkpoint

    ck = load_checkpoint(path, dtype=torch.float32)
    with torch.device("meta"):
        model = CausalLM(ck.config)
    model.to_empty(device=device)
    model.rope = RotaryEmbedding(ck.config, ck.config.max_position_embeddings).to(device)
    try:
        load_trunk_weights(model, ck.tensors)
    except ValueError as exc:
        raise ValueError(f"{ck.path}: {exc}") from None
    ck.tensors = {}
    return model.float().eval(), ck


def set_trainable(model: CausalLM, last_layers: int | None) -> list[torch.nn.Parameter]:
    """Freeze the trunk, then unfreeze its last `last_layers` decoder layers (None: all)
    and the final norm. The embedding and the unembedding stay frozen: the heads score
    through the same unembedding (tied to the embedding in small models), so moving it
    would shift every head's logits under them, and it is the largest matrix (its Adam
    state alone would be twice its size)."""
    n_all = model.config.num_layers
    n = n_all if last_layers is None else last_layers
    if not 1 <= n <= n_all:
        raise ValueError(f"--trunk-layers {n}: the model has {n_all} decoder layers")
    model.requires_grad_(False)
    for m in [*model.layers[n_all - n:], model.norm]:
        m.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


class StepKV:
    """The KV-cache interface for one training forward over whole sequences: each layer's
    keys/values are this step's only, padded to [B, Hkv, L, D]. Nothing is written in
    place into a preallocated buffer, so autograd sees ordinary tensors."""

    def __init__(self, B: int, L: int) -> None:
        self.B, self.L = B, L
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}

    def _padded(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        if meta.q_scatter is not None:  # packed rows -> [B*L] with zero padding
            x = x.new_zeros(self.B * self.L, *x.shape[1:]).index_copy(0, meta.q_scatter, x)
        return x.view(self.B, self.L, *x.shape[1:]).transpose(1, 2)

    def write(self, layer: int, meta: AttentionMetadata, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer], self.v[layer] = self._padded(k, meta), self._padded(v, meta)

    def keys(self, layer: int, meta: AttentionMetadata) -> torch.Tensor:
        return self.k[layer]

    def values(self, layer: int, meta: AttentionMetadata) -> torch.Tensor:
        return self.v[layer]


def trunk_hidden(model: CausalLM, seqs: list[list[int]]) -> torch.Tensor:
    """Whole sequences from position 0, one packed causal forward -> hidden [sum n, H]."""
    dev = model.embed_tokens.weight.device
    counts = [len(s) for s in seqs]
    B, L = len(seqs), max(counts)
    q_gather, q_scatter = padded_layout(counts, dev)
    pos = torch.cat([torch.arange(n) for n in counts]).to(dev)
    seq_of = torch.repeat_interleave(torch.arange(B), torch.tensor(counts)).to(dev)
    meta = AttentionMetadata(
        positions=pos, token_slots=seq_of, token_store=pos, seq_slots=torch.arange(B, device=dev),
        slot_start=0, kv_len=L, num_seqs=B, q_len=L, q_gather=q_gather, q_scatter=q_scatter,
        # Causal for every row; a pad row attends to earlier pad keys (zeros), never read back.
        mask=torch.ones(L, L, dtype=torch.bool, device=dev).tril_()[None, None])
    ids = torch.tensor([t for s in seqs for t in s], dtype=torch.long, device=dev)
    return model(ids, meta, StepKV(B, L))


def hf_tensors(model: CausalLM) -> dict[str, torch.Tensor]:
    """The model's weights under the names `load_trunk_weights` reads (q/k/v and
    gate/up split again), for export_checkpoint."""
    cfg = model.config
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    out = {}
    for name, p in model.named_parameters():
        t = p.detach()
        pre, _, leaf = name.rpartition(".")
        if pre.endswith("qkv_proj"):
            for part, x in zip("qkv", t.split([q, kv, kv], 0)):
                out[f"{pre[:-8]}{part}_proj.{leaf}"] = x
        elif pre.endswith("gate_up_proj"):
            for part, x in zip(("gate", "up"), t.split(cfg.intermediate_size, 0)):
                out[f"{pre[:-12]}{part}_proj.{leaf}"] = x
        else:
            out[name] = t
    return out


def export_trunk(model: CausalLM, ck, out: Path) -> Path:
    """The fine-tuned trunk as a Hugging Face folder (fp32) with the original tokenizer."""
    from ..model.checkpoint import LoadedCheckpoint
    from ..tools.export import export_checkpoint

    done = LoadedCheckpoint(model.config, hf_tensors(model), ck.tokenizer, ck.name, ck.path)
    return export_checkpoint(done, out, "float32", force=True)  # OUT/model is ours to replace
