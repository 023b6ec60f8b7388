"""The K/V write + attention of one layer as ONE opaque op, for the compiled forward.

A compiled trunk (compiled.py) is traced over token ids and positions only; everything
that describes the step's sequences (cache rows, kv length, tree masks, the padded query
layout, attention groups) changes from step to step in shape as well as value, so it
stays out of the graph: the engine installs the step's `AttentionMetadata` and KV cache
with `step_context`, and `torch.ops.mtpserve.cached_attention(q, k, v, layer, scale)`
reads them when it runs (the same design as vLLM's forward context + attention op).
Inductor sees an op from [T, H, D] to [T, H, D] and fuses everything around it.

Rows past the step's real count (the compiled graph's padding of a one-row step) neither write the
cache nor attend: the op runs the eager kernels on the real rows and returns zeros for
the padding rows, whose outputs the caller drops.
"""

from __future__ import annotations

from contextlib import contextmanager
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch

from .attention import write_and_attend
from .attention_metadata import AttentionMetadata
from .row_attention import row_layout

if TYPE_CHECKING:
    from .kv_cache import KVCache


class _Step:
    kv: KVCache | None = None
    meta: AttentionMetadata | None = None
    rows: int = 0  # real rows; the op's inputs may have more (padding)
    row_kernel: bool = False  # decode/tree rows through row_attention (attend_cached's rows)
    invariant: bool = False  # the batch-invariant attention (attend_cached's batch_invariant)


# The one exception to "no per-step state in module globals": a compiled graph cannot take
# the step's metadata as inputs (its shapes change every step), and a custom op cannot take
# Python objects. The state lives only inside `step_context`, set and cleared around one
# compiled call by the engine's thread; the eager path never reads it.
_STEP = _Step()


@contextmanager
def step_context(kv: KVCache, meta: AttentionMetadata, rows: int, row_kernel: bool = False,
                 invariant: bool = False) -> Iterator[None]:
    """Within: cached_attention reads `meta` and writes `kv` for the first `rows` rows,
    attending as the eager trunk does with CausalLM.attention_kernel 'rows' (row_kernel)
    and CausalLM.batch_invariant (invariant); so does attention_op's C++ op (row_kernel:
    the kernel is loaded), which takes decode/tree steps without calling into Python."""
    _STEP.kv, _STEP.meta, _STEP.rows = kv, meta, rows
    _STEP.row_kernel, _STEP.invariant = row_kernel, invariant
    # A step of decode/tree rows alone (write_and_attend's one-call case): the C++ op
    # takes it whole, its layout installed once instead of read by Python 30 times.
    in_cpp = row_kernel and meta.rows_alone
    if in_cpp:
        if meta.row_layout is None:
            meta.row_layout = row_layout(meta, rows, meta.positions.device)
        torch.ops.mtpserve_rows.set_step_rows(kv.buf, meta.token_slots, meta.token_store,
                                              *meta.row_layout, rows)
    try:
        yield
    finally:
        _STEP.kv, _STEP.meta, _STEP.rows = None, None, 0
        _STEP.row_kernel = _STEP.invariant = False
        if in_cpp:
            torch.ops.mtpserve_rows.clear_step_rows()


# Defined with torch.library.Library, not the custom_op decorator: a call through the
# decorator's wrapper costs ~11 us against ~4 us here, and the op runs 30 times a step.
_LIB = torch.library.Library("mtpserve", "DEF")
_LIB.define("cached_attention(Tensor q, Tensor k, Tensor v, int layer, float scale) -> Tensor")


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int,
                     scale: float) -> torch.Tensor:
    """q [Tp, Hq, D], k/v [Tp, Hkv, D] -> [Tp, Hq, D]: write the real rows' K/V into
    `layer` of the step's cache and attend over it (attention.write_and_attend)."""
    kv, meta, n = _STEP.kv, _STEP.meta, _STEP.rows
    if kv is None or meta is None:
        raise RuntimeError("mtpserve::cached_attention ran outside step_context")
    padded = q.shape[0]
    if n != padded:
        q, k, v = q[:n], k[:n], v[:n]
    out = write_and_attend(q, k, v, kv, layer, meta, scale, _STEP.invariant, _STEP.row_kernel)
    if n == padded:
        return out if out.data_ptr() != q.data_ptr() else out.clone()
    full = out.new_zeros(padded, *out.shape[1:])
    full[:n] = out
    return full


def _fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, scale: float
          ) -> torch.Tensor:
    return torch.empty_like(q)


_LIB.impl("cached_attention", cached_attention, "CompositeExplicitAutograd")
torch.library.register_fake("mtpserve::cached_attention", _fake, lib=_LIB)


def attention_op(row_kernel: bool) -> Callable[..., torch.Tensor]:
    """The op a compiled layer calls, (q, k, v, layer, scale) -> out: with the row kernel
    loaded, `mtpserve_rows::step_attention` (C++: a decode/tree step's 30 calls run no
    Python; any other step it hands to cached_attention), else cached_attention."""
    if row_kernel:
        return torch.ops.mtpserve_rows.step_attention
    return torch.ops.mtpserve.cached_attention
