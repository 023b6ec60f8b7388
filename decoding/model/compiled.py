"""The trunk's forward compiled with torch.compile (inductor: C++/OpenMP on CPU): ONE graph
for every row count.

The graph's inputs are the step's token ids and positions, with the row count dynamic:
one graph serves a decode row, a draft tree, a batch of sequences and a prefill chunk,
so every step runs compiled and a row's bits do not depend on how many rows share the
pass (the same generated code whatever the count; tests/decoding/test_compiled.py checks
it bitwise, which is what lets --batch-invariant and --compile go together). A one-row
step is padded to two rows: dynamo would specialize a graph for a size of 1. The
per-step attention metadata (cache rows, kv length, tree masks, padded query layout) is
no graph input at all: `step_attention.cached_attention` reads it from `step_context`
while the graph runs and touches only the real rows, so the padding row writes no K/V;
its hidden row is dropped here, and our int4 kernel skips it (`int4_vnni.live_rows`).

Quantized weights stay graph inputs: our int4/int8 kernels take them as they are, so
inductor's `freezing` (weights as constants, folded and pre-packed) gains a quantized
step nothing measurable while its constant folding over the real weights cost a cached
start ~16 s of its ~29 (docs/experiments.md). Dense weights are frozen (inductor packs
them for oneDNN); the engine never changes weights after load, which freezing assumes.

`compiles` counts graphs handed to inductor (the backend is wrapped): after `warm_up`
serving must leave it unchanged (tests/decoding/test_compiled.py, benchmarks/compiled_step.py).
After warm-up, dynamo's guards are not evaluated: the full guard set costs ~0.7 ms a call
for this many weights, and nothing it checks changes while serving (the zero-recompile
test holds that). Nor does dynamo's frame evaluation run at all: each instance compiles
its own copy of `_body`'s code, so once warm dynamo's cache holds exactly one entry for
it, and that entry's code (what dynamo would run once its guards pass) is called as a
plain function (~0.5 ms a call less, benchmarks/step_host_ab.py), after a check of
what the guards would have seen differently here: inference mode and int64 inputs on the
model's device. Anything else goes through dynamo (`skip_guard_eval_unsafe`, then full
guards and a recompile).

A quantized trunk's graph is also saved whole (saved_graph.py, torch's aot_compile): a
later start with the same model, code and machine reads it instead of tracing the trunk
with dynamo again (~5 s of a warm start's compile); the saved graph's code is then what
runs as the direct path.
"""

from __future__ import annotations

import logging
import os
import time
import types
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from . import saved_graph
from .int4_vnni import live_rows
from .kernel_build import missing_compiler, user_cache_dir
from .linear import WIDE_ROWS, Linear
from .step_attention import step_context
from .trunk import CausalLM

if TYPE_CHECKING:
    from .attention_metadata import AttentionMetadata
    from .kv_cache import KVCache

MODES = ("default", "max-autotune-no-cudagraphs")
log = logging.getLogger(__name__)

MIN_ROWS = 2  # one-row steps are padded to this: a dynamic graph is not specialized for 1


def compile_wanted(mode: str, device_type: str, weight_format: str) -> bool:
    """--compile off|on|auto -> compile or not. auto: where it measured faster, the CPU with
    a quantized trunk (docs/benchmarks.md), where inductor finds a C++ compiler (else it
    would fail after tracing, ~20 s into the start)."""
    if mode == "auto":
        if device_type != "cpu" or weight_format not in ("int4", "int8"):
            return False
        missing = missing_compiler("g++")  # inductor's CPU compiler
        if missing is not None:
            log.warning("--compile auto: %s; serving without compilation (slower)", missing)
        return missing is None
    return mode == "on"


def inductor_options(mode: str, device_type: str = "cpu", weight_format: str = "dense"
                     ) -> dict:
    """Inductor's options for `mode`: dense weights frozen into the graph, quantized ones
    not (see the module docstring), no CUDA graphs (not this path's, yet). On CPU the
    graph's wrapper (the code that allocates buffers and calls each kernel in turn) is
    generated as C++, not Python: a decode step 0.91x the time (benchmarks/step_host_ab.py),
    compiled apart from the kernels at -O1 so the first start grows ~3 s, not ~25."""
    if mode not in MODES:
        raise ValueError(f"compile mode must be one of {MODES}, got {mode!r}")
    options = dict(torch._inductor.list_mode_options(mode))
    options.pop("triton.cudagraphs", None)
    options["freezing"] = weight_format == "dense"
    if device_type == "cpu":
        options["cpp_wrapper"] = True
        options["cpp_wrapper_build_separate"] = True
    return options


def use_user_cache_dir() -> None:
    """Inductor's on-disk caches (compiled graphs, autotuning results) under the user's
    cache folder, so they outlive /tmp being cleared: a second start compiles in seconds.
    Call before anything asks inductor for its cache folder (it then pins the default
    into the environment); an explicit TORCHINDUCTOR_CACHE_DIR wins."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(user_cache_dir() / "inductor"))


def own_copy(fn: Callable) -> tuple[types.FunctionType, types.CodeType]:
    """`fn` (a function, or a method's function) with a code object of its own, and that
    code: dynamo caches compiled code per code object, so what one compiles from the copy
    is the copy's alone (see direct_code)."""
    fn = getattr(fn, "__func__", fn)
    code = fn.__code__.replace()
    return types.FunctionType(code, fn.__globals__, fn.__name__), code


def direct_code(code: types.CodeType, fn_globals: dict) -> Callable | None:
    """The code dynamo runs for `code` once its guards pass, as a plain function with the
    original's arguments; None unless dynamo's cache holds exactly one entry for it (a
    recompile made two: dynamo must choose) or where this torch lacks the API."""
    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list
        entries = _debug_get_cache_entry_list(code)
    except (ImportError, AttributeError, TypeError):
        return None
    if len(entries) != 1:
        return None
    return types.FunctionType(entries[0].code, fn_globals, f"compiled_{code.co_name}")


def inference_inputs(device: torch.device, *tensors: torch.Tensor) -> bool:
    """What dynamo's guards check that a warm compiled call could change: the grad mode
    and the inputs' kind (inference tensors on `device`, as the warm-up made them)."""
    return torch.is_inference_mode_enabled() and all(
        t.is_inference() and t.device == device for t in tensors)


class CompiledTrunk:
    """`model.run_layers` compiled once for every row count; call it like
    `model(ids, meta, kv)`. None back: a step this graph leaves to the eager model (only
    passes of WIDE_ROWS+ rows while the layers keep bf16 wide copies, see `eager_from`)."""

    def __init__(self, model: CausalLM, mode: str = "max-autotune-no-cudagraphs",
                 return_pre_last: bool = False, save: bool = True) -> None:
        self.device = next(model.parameters()).device
        self.options = inductor_options(mode, self.device.type, model.weight_format)
        self.model = model
        linears = [m for m in model.layers.modules() if isinstance(m, Linear)]
        if any(m.packed_weight is not None for m in linears):
            # inductor lowers oneDNN's linear only from a plain weight it packs itself
            raise ValueError("--compile on: the trunk's dense weights are kept in oneDNN's "
                             "packed layout, which the compiled path cannot take yet; use "
                             "--weights int4/int8, or --compile off")
        # The graph multiplies every row by the layers' one-row kernels. Where layers keep
        # a bf16 wide copy (PyTorch's int4/int8 kernels, not batch-invariant), the eager
        # step's copy is faster for prefill-sized passes: those stay eager.
        wide = any(m.wide_weight is not None for m in linears) and not model.batch_invariant
        self.eager_from: int | None = WIDE_ROWS if wide else None
        self.return_pre_last = return_pre_last
        self.warm = False  # set after warm_up: guards then skipped
        self.compiles = 0  # graphs compiled by inductor
        self.loaded = 0  # graphs read from disk instead (saved_graph)
        self._loaded_key: str | None = None  # the key it was read under
        # save/load the graph whole: CPU (the path tested here) and not frozen (a frozen
        # graph holds the weights, which no file name can vouch for)
        self.save = save and self.device.type == "cpu" and not self.options["freezing"]
        self.compile_seconds = 0.0  # warm-up wall time
        self.steps = 0  # forwards served compiled
        use_user_cache_dir()
        # `_body` with a code object of its own, so that this instance's graph is the one
        # entry of dynamo's cache for it (direct_code)
        own, self._code = own_copy(CompiledTrunk._body)
        # dynamic=None + mark_dynamic: only the row count is symbolic (dynamic=True would
        # also trace the layers' float attributes as inputs, then recompile them as constants)
        self._fn = torch.compile(types.MethodType(own, self), backend=self._backend,
                                 fullgraph=True)
        # the warm graph's code without dynamo (direct_code): set by warm_up, None when not warm
        self._direct: Callable | None = None
        self.direct_steps = 0  # forwards served through _direct

    def _backend(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        from torch._inductor.compile_fx import compile_fx

        self.compiles += 1
        return compile_fx(gm, example_inputs, config_patches=self.options)

    def _body(self, ids: torch.Tensor, positions: torch.Tensor):
        return self.model.run_layers(ids, positions, None, None, self.return_pre_last)

    def __call__(self, ids: torch.Tensor, meta: AttentionMetadata, kv: KVCache
                 ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None:
        rows = ids.shape[0]
        if self.eager_from is not None and rows >= self.eager_from:
            return None
        positions = meta.positions
        if rows < MIN_ROWS:
            ids = torch.cat([ids, ids.new_zeros(MIN_ROWS - rows)])
            positions = torch.cat([positions, positions.new_zeros(MIN_ROWS - rows)])
        if not self.warm:
            torch._dynamo.mark_dynamic(ids, 0)
            torch._dynamo.mark_dynamic(positions, 0)
        with step_context(kv, meta, rows, self.model.attention_kernel == "rows",
                          self.model.batch_invariant), live_rows(rows, ids.shape[0]):
            if (self._direct is not None and ids.dtype == positions.dtype == torch.long
                    and inference_inputs(self.device, ids, positions)):
                out = self._direct(self, ids, positions)
                self.direct_steps += 1
            else:
                out = self._run_warm(ids, positions) if self.warm else self._traced(ids, positions)
        self.steps += 1
        if rows >= MIN_ROWS:
            return out
        if isinstance(out, tuple):
            return tuple(t[:rows] for t in out)
        return out[:rows]

    def _traced(self, ids: torch.Tensor, positions: torch.Tensor):
        """The graph with its guards, compiling where they fail. Only the row count is
        dynamic: dynamo's automatic dynamic shapes would make symbolic whatever differed
        between two compiles of this code (weight sizes, say) instead of recompiling."""
        with torch._dynamo.config.patch(automatic_dynamic_shapes=False, recompile_limit=64):
            return self._fn(ids, positions)

    def _run_warm(self, ids: torch.Tensor, positions: torch.Tensor):
        """The graph without its guards. An input the warm-up did not cover (say, a tensor
        made outside inference mode) makes dynamo refuse before anything runs: full
        guards from then on, and it compiles what it needs."""
        try:
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                return self._fn(ids, positions)
        except RuntimeError as e:
            if "skip_guard_eval_unsafe" not in str(e):
                raise
            self.warm, self._direct = False, None
            return self._traced(ids, positions)

    def _warm_inputs(self, kv: KVCache, slot: int, rows: int
                     ) -> tuple[torch.Tensor, AttentionMetadata]:
        """A pass of `rows` tokens at positions 0.. of cache `slot`."""
        from .attention_metadata import AttentionMetadata

        dev = self.device
        kv.ensure_initialized(slot, rows)
        ar = torch.arange(rows, device=dev)
        meta = AttentionMetadata(
            positions=ar, token_slots=torch.full((rows,), slot, device=dev), token_store=ar,
            seq_slots=torch.tensor([slot], device=dev), slot_start=slot, kv_len=rows,
            num_seqs=1, q_len=rows, q_gather=None, q_scatter=None,
            mask=torch.ones(rows, rows, dtype=torch.bool, device=dev).tril_()[None, None])
        return torch.zeros(rows, dtype=torch.long, device=dev), meta

    def _saved_or_ahead(self, kv: KVCache, slot: int, rows: int) -> Callable | None:
        """The graph as a plain function (its guards off): read from disk, else compiled
        now with aot_compile from a pass of `rows` and saved for the next start. None where
        compiling ahead fails: the first pass then compiles through torch.compile."""
        def ahead():
            ids, meta = self._warm_inputs(kv, slot, rows)
            with step_context(kv, meta, rows, self.model.attention_kernel == "rows",
                              self.model.batch_invariant):
                torch._dynamo.mark_dynamic(ids, 0)
                torch._dynamo.mark_dynamic(meta.positions, 0)
                with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
                    return self._fn.aot_compile(((ids, meta.positions), {}))

        key = saved_graph.graph_key(self.model, self.options,
                                    {"return_pre_last": self.return_pre_last})
        fn, loaded = saved_graph.load_or_compile(key, "trunk", ahead)
        if loaded:
            self.loaded += 1
            self._loaded_key = key
        return fn

    @torch.inference_mode()
    def warm_up(self, kv: KVCache, slot: int = 0,
                progress: Callable[..., None] | None = None) -> float:
        """Compile the graph (or read it from disk): passes of a few row counts at
        positions 0.. of cache `slot` (whose contents are overwritten: call before
        serving, with a free slot). Returns the seconds it took. progress(fmt, *args): a
        line before each step (a cold compile is under a minute on 2 cores; seconds from
        the on-disk caches)."""
        t0 = time.perf_counter()
        # The first pass compiles; the second checks that another count reuses the graph.
        sizes = [n for n in (MIN_ROWS, 2 * WIDE_ROWS + 1) if n <= kv.slot_len]
        if self.save and self._direct is None:
            if progress is not None:
                progress("compiling the trunk: one graph for every row count (or reading it "
                         "from %s; inductor's cache %s)", saved_graph.graph_folder(),
                         os.environ["TORCHINDUCTOR_CACHE_DIR"])
            self._direct = self._saved_or_ahead(kv, slot, sizes[0])
        for i, b in enumerate(sizes):
            if progress is not None:
                progress("compiling the trunk: one graph for every row count (pass %d/%d, "
                         "%.0f s so far; cache %s)", i + 1, len(sizes),
                         time.perf_counter() - t0, os.environ["TORCHINDUCTOR_CACHE_DIR"])
            try:
                self(*self._warm_inputs(kv, slot, b), kv)
            except Exception:
                if self._loaded_key is not None:  # read from disk and does not run: not again
                    saved_graph.discard(self._loaded_key, "trunk")
                raise
        self.compile_seconds = time.perf_counter() - t0
        self.warm = True
        if self._direct is None:
            self._direct = direct_code(self._code, CompiledTrunk._body.__globals__)
        return self.compile_seconds
