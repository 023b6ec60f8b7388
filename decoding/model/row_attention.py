"""Row attention (kernels/row_attention.cpp, the torch op `mtpserve_rows::row_attention`):
decode rows and draft-tree rows attend over the KV cache one (row, KV head) at a time, each
over its own keys in cache order with an online softmax, so a row's result is the same
whatever else is in the pass (batch-invariant by construction) and costs no gather.

A row's keys are described by `row_layout`, built once per step from the step's
`AttentionMetadata` (and kept on it for the other layers): its cache slot, the length of
the committed prefix it sees ([0, prefix)) and the few cache indices after that (its tree
ancestors and itself). The extension is built with int4_vnni's loader; where it does not
build or load, `available()` is False with one warning and attention keeps SDPA /
attend_invariant (attention.attend_cached).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .attention_metadata import AttentionMetadata
from .kernel_build import BuiltOnce, build_extension

if TYPE_CHECKING:
    from .kv_cache import KVCache


SOURCE = Path(__file__).with_name("kernels") / "row_attention.cpp"
KERNELS = ("auto", "sdpa", "rows")  # EngineConfig.attention_kernel



def _build() -> bool:
    if not build_extension(SOURCE, "row attention kernel", "SDPA for attention"):
        return False
    torch.library.register_fake("mtpserve_rows::row_attention")(_fake)
    torch.library.register_fake("mtpserve_rows::write_row_attention")(_fake_write)
    torch.library.register_fake("mtpserve_rows::step_attention")(_fake_step)
    return True


def _fake(q, kv, slot, prefix, offsets, extra, scale):
    return torch.empty_like(q)


def _fake_write(q, k, v, kv, store_slot, store_pos, slot, prefix, offsets, extra, scale):
    return torch.empty_like(q)


def _fake_step(q, k, v, layer, scale):
    return torch.empty_like(q)


_kernel = BuiltOnce(_build)
available = _kernel.available


def kernel_path() -> str:
    """The path this process computes with: 'avx512', 'avx2' (CPUs without AVX-512, or
    MTPSERVE_ROWS_AVX2), 'generic' (C++ without vectors; MTPSERVE_ROWS_GENERIC), or 'none'
    where the kernel is not available."""
    if not available():
        return "none"
    return {2: "avx512", 1: "avx2"}.get(int(torch.ops.mtpserve_rows.isa()), "generic")


def resolve(name: str, device: torch.device | str, kv_dtype: torch.dtype) -> str:
    """EngineConfig.attention_kernel -> 'rows' or 'sdpa' for a cache on `device` in
    `kv_dtype` (the kernel reads an fp32 or fp16 CPU cache)."""
    if name not in KERNELS:
        raise ValueError(f"attention_kernel must be auto|sdpa|rows, got {name!r}")
    if name == "sdpa":
        return "sdpa"
    fits = torch.device(device).type == "cpu" and kv_dtype in (torch.float32, torch.float16)
    if fits and available():
        return "rows"
    if name == "rows":
        raise ValueError("--attention-kernel rows: the row attention kernel cannot run here "
                         "(an fp32/fp16 KV cache on CPU and a C++ compiler are needed; see the "
                         "warning above); use --attention-kernel auto or sdpa")
    return "sdpa"


def row_layout(meta: AttentionMetadata, rows: int, device: torch.device | str = "cpu"
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per packed row of `meta`: (cache slot [T], prefix [T], offsets [T + 1], extra [E]):
    row t sees cache indices [0, prefix[t]) then extra[offsets[t]:offsets[t + 1]], all in
    cache order (the True entries of its mask row: committed prefix, then its ancestors)."""
    if meta.mask is None:  # one sequence, one row: keys [0, kv_len)
        slots = meta.seq_slots[:1].expand(rows).contiguous()
        prefix = torch.full((rows,), meta.kv_len, dtype=torch.long, device=device)
        return slots, prefix, torch.zeros(rows + 1, dtype=torch.long, device=device), \
            torch.zeros(0, dtype=torch.long, device=device)
    lq, L = meta.q_len, meta.kv_len
    padded = (meta.q_scatter if meta.q_scatter is not None
              else torch.arange(rows, device=device))
    visible = meta.mask.reshape(meta.num_seqs * lq, L)[padded]
    hidden = ~visible
    prefix = torch.where(hidden.any(-1), hidden.to(torch.uint8).argmax(-1), L)
    tail = visible & (torch.arange(L, device=device) >= prefix[:, None])
    offsets = torch.zeros(rows + 1, dtype=torch.long, device=device)
    torch.cumsum(tail.sum(-1), 0, out=offsets[1:])
    extra = tail.nonzero()[:, 1].contiguous()  # row-major: by row, then cache order
    return meta.seq_slots[padded // lq].contiguous(), prefix.contiguous(), offsets, extra


def attend_rows(q: torch.Tensor, kv: KVCache, layer: int, meta: AttentionMetadata,
                scale: float) -> torch.Tensor:
    """q: [T, Hq, D] -> [T, Hq, D] in q's dtype: each row over its keys (row_layout, built
    at the step's first layer and kept on `meta`), computed in fp32 by the C++ kernel."""
    if meta.row_layout is None:
        meta.row_layout = row_layout(meta, q.shape[0], q.device)
    out = torch.ops.mtpserve_rows.row_attention(q.float(), kv.buf[layer], *meta.row_layout,
                                                scale)
    return out if q.dtype == torch.float32 else out.to(q.dtype)


def write_attend_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: KVCache,
                      layer: int, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """kv.write(layer, meta, k, v) then attend_rows, as one kernel call: the K/V copy
    happens in C++ (a decode layer's stack + cast + index_put cost more than the copy)."""
    if meta.row_layout is None:
        meta.row_layout = row_layout(meta, q.shape[0], q.device)
    out = torch.ops.mtpserve_rows.write_row_attention(
        q.float(), k, v, kv.buf[layer], meta.token_slots, meta.token_store, *meta.row_layout,
        scale)
    return out if q.dtype == torch.float32 else out.to(q.dtype)
