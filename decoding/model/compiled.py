"""The trunk's forward compiled with torch.compile (inductor: C++/OpenMP on CPU), one graph
per row-count bucket.

The graph's inputs are the step's token ids and positions, padded to the next bucket
(`DEFAULT_BUCKETS`); each bucket is compiled once, with static shapes, at warm-up. The
per-step attention metadata (cache rows, kv length, tree masks, padded query layout) is no
graph input at all: `step_attention.cached_attention` reads it from `step_context` while
the graph runs, and touches only the real rows, so padding rows write no K/V; their
hidden rows are dropped here. A step with more rows than the largest bucket (a prefill
chunk) runs eagerly.

The weights are frozen into each graph (inductor's `freezing`): constants, not inputs, so
inductor may pre-pack them and pick its own kernels for them: with max-autotune its C++
weight-only int4 micro-GEMM beats aten's int4 kernel at few rows, and oneDNN's packed
linear (the bf16 wide copy of 12+ rows, dense CPU weights) lowers only for a constant
weight. The engine never changes weights after load, which is what freezing assumes.

`compiles` counts graphs handed to inductor (the backend is wrapped): after `warm_up`
serving must leave it unchanged (tests/decoding/test_compiled.py, benchmarks/compiled_step.py).
After warm-up, dynamo's guards are evaluated only where they tell the buckets apart
(`skip_guard_eval_unsafe`): the full guard set costs ~0.7 ms a call for this many weights,
and nothing it checks changes while serving (the zero-recompile test holds that).
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Callable

import torch

from .kernel_build import user_cache_dir
from .linear import Linear
from .step_attention import step_context
from .trunk import CausalLM

if TYPE_CHECKING:
    from .attention_metadata import AttentionMetadata
    from .kv_cache import KVCache

# Decode of 1..8 sequences and verify passes up to 8 rows (padding costs at most 2x rows).
# Larger steps run eagerly: their bf16 wide copy beats the compiled int4 GEMM from ~12
# rows (docs/benchmarks.md), and each bucket is ~1 min of cold compile.
DEFAULT_BUCKETS = (1, 2, 4, 8)
MODES = ("default", "max-autotune-no-cudagraphs")


def compile_wanted(mode: str, device_type: str, weight_format: str, batch_invariant: bool
                   ) -> bool:
    """--compile off|on|auto -> compile or not. auto: where it measured faster, the CPU with
    a quantized trunk (docs/benchmarks.md); never with --batch-invariant on (the compiled
    graph's kernels are not checked against the row rule)."""
    if mode == "auto":
        return device_type == "cpu" and weight_format in ("int4", "int8") and not batch_invariant
    return mode == "on"


def use_user_cache_dir() -> None:
    """Inductor's on-disk caches (compiled graphs, autotuning results) under the user's
    cache folder, so they outlive /tmp being cleared: a second start compiles in seconds.
    An explicit TORCHINDUCTOR_CACHE_DIR wins."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(user_cache_dir() / "inductor"))


class CompiledTrunk:
    """`model.run_layers` compiled per bucket; call it like `model(ids, meta, kv)`, with None
    back for a step larger than every bucket (the caller runs the model eagerly)."""

    def __init__(self, model: CausalLM, buckets: tuple[int, ...] = DEFAULT_BUCKETS,
                 mode: str = "max-autotune-no-cudagraphs", return_pre_last: bool = False) -> None:
        if mode not in MODES:
            raise ValueError(f"compile mode must be one of {MODES}, got {mode!r}")
        self.model = model
        self.buckets = tuple(sorted(set(buckets)))
        if not self.buckets or self.buckets[0] < 1:
            raise ValueError(f"compile buckets must be positive row counts, got {buckets}")
        if any(isinstance(m, Linear) and m.packed_weight is not None
               for m in model.layers.modules()):
            # inductor lowers oneDNN's linear only from a plain weight it packs itself
            raise ValueError("--compile on: the trunk's dense weights are kept in oneDNN's "
                             "packed layout, which the compiled path cannot take yet; use "
                             "--weights int4/int8, or --compile off")
        self.return_pre_last = return_pre_last
        self.options = dict(torch._inductor.list_mode_options(mode))
        self.options.pop("triton.cudagraphs", None)  # CUDA graphs: not this path's (yet)
        self.options["freezing"] = True
        self.warm = False  # set after warm_up: guards then checked only between buckets
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
        with step_context(kv, meta, rows, self.model.attention_kernel == "rows"):
            out = self._run_warm(ids, positions) if self.warm else self._fn(ids, positions)
        self.steps_by_bucket[b] = self.steps_by_bucket.get(b, 0) + 1
        if b == rows:
            return out
        if isinstance(out, tuple):
            return tuple(t[:rows] for t in out)
        return out[:rows]

    def _run_warm(self, ids: torch.Tensor, positions: torch.Tensor):
        """The graph with only the guards that tell buckets apart. An input the warm-up did
        not cover (say, a tensor made outside inference mode) makes dynamo refuse before
        anything runs: full guards from then on, and it compiles what it needs."""
        try:
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                return self._fn(ids, positions)
        except RuntimeError as e:
            if "skip_guard_eval_unsafe" not in str(e):
                raise
            self.warm = False
            return self._fn(ids, positions)

    @torch.inference_mode()
    def warm_up(self, kv: KVCache, slot: int = 0,
                progress: Callable[..., None] | None = None) -> float:
        """Compile every bucket: one pass of b rows at positions 0..b-1 of cache `slot`
        (whose contents are overwritten: call before serving, with a free slot). Returns
        the seconds it took. progress(fmt, *args): a line per bucket (a cold compile is
        about a minute each on 2 cores; seconds from the on-disk cache)."""
        from .attention_metadata import AttentionMetadata

        use_user_cache_dir()
        t0 = time.perf_counter()
        dev = self.device
        for i, b in enumerate(self.buckets):
            if b > kv.slot_len:
                break
            if progress is not None:
                progress("compiling the trunk for %d row(s) (%d/%d, %.0f s so far; cache %s)",
                         b, i + 1, len(self.buckets), time.perf_counter() - t0,
                         os.environ["TORCHINDUCTOR_CACHE_DIR"])
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
        self.warm = True
        return self.compile_seconds
