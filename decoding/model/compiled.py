"""The trunk's forward compiled with torch.compile (inductor: C++/OpenMP on CPU), one graph
per row-count bucket.

The graph's inputs are the step's token ids and positions, padded to the next bucket
(`DEFAULT_BUCKETS`); each bucket is compiled once, with static shapes, at warm-up. The
per-step attention metadata (cache rows, kv length, tree masks, padded query layout) is no
graph input at all: `step_attention.cached_attention` reads it from `step_context` while
the graph runs, and touches only the real rows, so padding rows write no K/V; their
hidden rows are dropped here. A step with more rows than the largest bucket (a prefill
chunk) runs eagerly.

`compiles` counts graphs handed to inductor (the backend is wrapped): after `warm_up`
serving must leave it unchanged (tests/decoding/test_compiled.py, benchmarks/compiled_step.py).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from .linear import WIDE_ROWS, Linear
from .step_attention import step_context
from .trunk import CausalLM

if TYPE_CHECKING:
    from .attention_metadata import AttentionMetadata
    from .kv_cache import KVCache

# Decode of 1..16 sequences and verify passes up to 64 rows; padding costs at most 2x rows
# (the int4 kernels are linear in rows, in blocks of 4).
DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
MODES = ("default", "max-autotune-no-cudagraphs")


def compilable_buckets(model: CausalLM, buckets: tuple[int, ...]) -> tuple[int, ...]:
    """The buckets inductor can compile for this model's weights. Its lowering of oneDNN's
    packed linear (mkldnn._linear_pointwise) needs the packed weight as a frozen constant,
    and this path passes weights as graph inputs: so no bucket of WIDE_ROWS+ rows where a
    quantized layer keeps a packed bf16 wide copy (those rows run eagerly), and no compiled
    path at all for dense CPU layers in the packed layout (ValueError)."""
    linears = [m for m in model.layers.modules() if isinstance(m, Linear)]
    if any(m.packed_weight is not None for m in linears):
        raise ValueError("--compile on: the trunk's dense weights are in oneDNN's packed layout, "
                         "which this compiled path cannot take as graph inputs yet; use "
                         "--weights int4/int8, or --compile off")
    out = tuple(sorted(set(buckets)))
    if any(m.wide_weight is not None for m in linears):
        out = tuple(b for b in out if b < WIDE_ROWS)
    if not out:
        raise ValueError(f"--compile on: no compilable bucket in {buckets}")
    return out


class CompiledTrunk:
    """`model.run_layers` compiled per bucket; call it like `model(ids, meta, kv)`, with None
    back for a step larger than every bucket (the caller runs the model eagerly)."""

    def __init__(self, model: CausalLM, buckets: tuple[int, ...] = DEFAULT_BUCKETS,
                 mode: str = "default", return_pre_last: bool = False) -> None:
        if mode not in MODES:
            raise ValueError(f"compile mode must be one of {MODES}, got {mode!r}")
        self.model = model
        self.buckets = compilable_buckets(model, buckets)
        self.return_pre_last = return_pre_last
        self.options = dict(torch._inductor.list_mode_options(mode))
        self.options.pop("triton.cudagraphs", None)  # CUDA graphs: not this path's (yet)
        self.compiles = 0  # graphs compiled by inductor
        self.compile_seconds = 0.0  # warm-up wall time
        self.steps_by_bucket: dict[int, int] = {}  # forwards served compiled, per bucket
        self.device = next(model.parameters()).device
        self._fn = torch.compile(self._body, backend=self._backend, dynamic=False,
                                 fullgraph=True)

    def _backend(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        from torch._inductor.compile_fx import compile_fx

        self.compiles += 1
        return compile_fx(gm, example_inputs, config_patches=self.options)

    def _body(self, ids: torch.Tensor, positions: torch.Tensor):
        return self.model.run_layers(ids, positions, None, None, self.return_pre_last)

    def bucket(self, rows: int) -> int | None:
        """The bucket a step of `rows` rows runs at; None: larger than every bucket."""
        for b in self.buckets:
            if b >= rows:
                return b
        return None

    def __call__(self, ids: torch.Tensor, meta: AttentionMetadata, kv: KVCache
                 ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None:
        rows = ids.shape[0]
        b = self.bucket(rows)
        if b is None:
            return None
        positions = meta.positions
        if b != rows:
            ids = torch.cat([ids, ids.new_zeros(b - rows)])
            positions = torch.cat([positions, positions.new_zeros(b - rows)])
        with step_context(kv, meta, rows):
            out = self._fn(ids, positions)
        self.steps_by_bucket[b] = self.steps_by_bucket.get(b, 0) + 1
        if b == rows:
            return out
        if isinstance(out, tuple):
            return tuple(t[:rows] for t in out)
        return out[:rows]

    @torch.inference_mode()
    def warm_up(self, kv: KVCache, slot: int = 0) -> float:
        """Compile every bucket: one pass of b rows at positions 0..b-1 of cache `slot`
        (whose contents are overwritten: call before serving, with a free slot). Returns
        the seconds it took."""
        from .attention_metadata import AttentionMetadata

        t0 = time.perf_counter()
        dev = self.device
        for b in self.buckets:
            if b > kv.slot_len:
                break
            kv.ensure_initialized(slot, b)
            ar = torch.arange(b, device=dev)
            mask = (torch.ones(b, b, dtype=torch.bool, device=dev).tril_()[None, None]
                     if b > 1 else None)
            meta = AttentionMetadata(
                positions=ar, token_slots=torch.full((b,), slot, device=dev), token_store=ar,
                seq_slots=torch.tensor([slot], device=dev), slot_start=slot, kv_len=b,
                num_seqs=1, q_len=b, q_gather=None, q_scatter=None, mask=mask)
            self(torch.zeros(b, dtype=torch.long, device=dev), meta, kv)
        self.compile_seconds = time.perf_counter() - t0
        return self.compile_seconds
