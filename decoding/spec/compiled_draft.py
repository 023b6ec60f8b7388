"""The draft chain of sequential heads compiled with torch.compile (inductor), beside the
compiled trunk.

Why: eagerly, drafting one depth is ~50 small ops (norms, the projections, attention over
the chain, the draft vocabulary's logits, top-k) whose dispatch costs more than the
bytes they read: 2.1 ms for a chain of 2 against a 6.4 ms plain step here
(benchmarks/step_phases.py), so a speculative step cost 1.5x a plain one. Inductor fuses
them into a few C++ loops around the int4 kernels.

One graph per chain depth (the depth is a Python int: the loop unrolls), each for every
batch size (the row count is dynamic; one row is padded to two, as the trunk's graph
does, since dynamo specializes a dimension of size 1; the int4 kernel skips the padding
row). `warm_up` compiles the depths the tree can ask for before serving; a failure leaves
drafting eager (the same drafts up to rounding: drafts only decide what verification
checks, never what is emitted). Once warm,
a depth's graph is called without dynamo's frame evaluation (model/compiled.py's
direct_code, as the trunk's). Over a quantized trunk each depth's graph is compiled ahead
and saved (model/saved_graph.py), so a later start reads it instead of tracing again.
Only chain-attention sequential heads (`SequentialMTPHeads.chain_tops`) compile: the
context-attending ones write a per-slot cache (mtp_context.py) and stay eager.
"""

from __future__ import annotations

import logging
import time
import types
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from ..model import saved_graph
from ..model.compiled import (
    MIN_ROWS,
    direct_code,
    inductor_options,
    inference_inputs,
    own_copy,
    use_user_cache_dir,
)
from ..model.int4_vnni import live_rows

if TYPE_CHECKING:
    from torch import nn

    from .mtp_sequential import SequentialMTPHeads

log = logging.getLogger(__name__)

# Chain depths compiled at startup (at least) for a tree given by name or file; `--tree
# auto` compiles the depths its timing reaches, then the chosen tree's (engine_setup.py).
# A deeper step drafts eagerly.
WARM_DEPTHS = 3


class ChainBody:
    """What a depth's graph is traced from: the heads and the trunk, nothing else (a saved
    graph's guards pickle what the traced `self` holds: not the chain's other graphs, which
    the heads reach once the chain is handed to them: `ahead` detaches it meanwhile)."""

    def __init__(self, heads: SequentialMTPHeads, model: nn.Module) -> None:
        self.heads, self.model = heads, model

    def body(self, hidden: torch.Tensor, tokens: torch.Tensor, pos0: torch.Tensor,
             depth: int) -> torch.Tensor:
        return self.heads.chain_tops(hidden, tokens, pos0, depth, self.model)


class CompiledDraftChain:
    """`heads.chain_tops(hidden, tokens, pos0, depth, model)` compiled; call it without
    `model`. `compiles` counts graphs handed to inductor (one per depth after warm-up)."""

    def __init__(self, heads: SequentialMTPHeads, model: nn.Module,
                 mode: str = "max-autotune-no-cudagraphs", save: bool = True) -> None:
        self.device = next(model.parameters()).device
        self.options = inductor_options(mode, self.device.type,
                                        getattr(model, "weight_format", "dense"))
        self.heads, self.model = heads, model
        self.compiles = 0
        self.loaded = 0  # depth graphs read from disk instead (saved_graph)
        self._loaded_keys: dict[int, str] = {}  # depth -> the key its graph was read under
        # as the trunk's: CPU, and not frozen (a frozen graph holds the weights)
        self.save = save and self.device.type == "cpu" and not self.options["freezing"]
        self.depths: set[int] = set()  # depths compiled (warm_up)
        self.dtype: torch.dtype | None = None  # the hidden states' dtype (warm_up's)
        use_user_cache_dir()
        self._owner = ChainBody(heads, model)
        # one copy of `ChainBody.body` per depth, each with a code object of its own: a depth's graph
        # is then the one entry of dynamo's cache for its code, and once warm it is called
        # without dynamo (model/compiled.py's direct_code, as the trunk's)
        self._fns: dict[int, Callable] = {}
        self._codes: dict[int, types.CodeType] = {}
        self._direct: dict[int, Callable] = {}
        self.direct_calls = 0  # drafting calls served through _direct

    def _backend(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        from torch._inductor.compile_fx import compile_fx

        self.compiles += 1
        return compile_fx(gm, example_inputs, config_patches=self.options)

    def __call__(self, hidden: torch.Tensor, tokens: torch.Tensor, pos0: torch.Tensor,
                 depth: int) -> torch.Tensor:
        """As chain_tops: [B, H], [B], [B] -> [B, depth, k]. A depth not compiled at
        warm-up runs eagerly rather than compile mid-serving."""
        if depth not in self.depths:
            return self.heads.chain_tops(hidden, tokens, pos0, depth, self.model)
        return self._run(hidden, tokens, pos0, depth)

    def _run(self, hidden: torch.Tensor, tokens: torch.Tensor, pos0: torch.Tensor,
             depth: int) -> torch.Tensor:
        B = hidden.shape[0]
        if B < MIN_ROWS:
            pad = MIN_ROWS - B
            hidden = torch.cat([hidden, hidden.new_zeros(pad, hidden.shape[1])])
            tokens = torch.cat([tokens, tokens.new_zeros(pad)])
            pos0 = torch.cat([pos0, pos0.new_zeros(pad)])
        direct = self._direct.get(depth)
        if (direct is not None and hidden.dtype == self.dtype
                and inference_inputs(self.device, hidden, tokens, pos0)):
            self.direct_calls += 1
            with live_rows(B, hidden.shape[0]):  # the int4 kernel skips the padding row
                return direct(self._owner, hidden, tokens, pos0, depth)[:B]
        for t in (hidden, tokens, pos0):
            torch._dynamo.mark_dynamic(t, 0)
        with torch._dynamo.config.patch(automatic_dynamic_shapes=False, recompile_limit=64), \
                live_rows(B, hidden.shape[0]):
            out = self._compiled(depth)(hidden, tokens, pos0, depth)
        self._direct.pop(depth, None)  # a call dynamo took may have compiled another entry
        return out[:B]

    def _compiled(self, depth: int) -> Callable:
        if depth not in self._fns:
            own, self._codes[depth] = own_copy(ChainBody.body)
            self._fns[depth] = torch.compile(types.MethodType(own, self._owner),
                                             backend=self._backend, fullgraph=True)
        return self._fns[depth]

    def _saved_or_ahead(self, depth: int, hidden: torch.Tensor) -> Callable | None:
        """Depth `depth`'s graph as a plain function (guards off): read from disk, else
        compiled now with aot_compile from a pass like `hidden` and saved. None where
        compiling ahead fails: the first pass then compiles through torch.compile."""
        def ahead():
            b = hidden.shape[0]
            tokens = torch.zeros(b, dtype=torch.long, device=hidden.device)
            pos0 = torch.arange(b, device=hidden.device)
            for t in (hidden, tokens, pos0):
                torch._dynamo.mark_dynamic(t, 0)
            # the guards aot_compile builds pickle the traced `self`'s heads, and with them
            # this chain once compile_draft_chain handed it over (extend: --tree auto's
            # deeper depths): its graphs hold dynamo's guard managers, which do not pickle
            installed, self.heads.compiled_chain = self.heads.compiled_chain, None
            try:
                with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
                    return self._compiled(depth).aot_compile(((hidden, tokens, pos0, depth), {}))
            finally:
                self.heads.compiled_chain = installed

        key = saved_graph.graph_key(self.heads, self.options, {
            "depth": depth, "dtype": str(hidden.dtype),
            "trunk": saved_graph.model_facts(self.model)})  # chain_tops reads the trunk's
        fn, loaded = saved_graph.load_or_compile(key, f"draft{depth}", ahead)
        if loaded:
            self.loaded += 1
            self._loaded_keys[depth] = key
        return fn

    @torch.inference_mode()
    def warm_up(self, depths: list[int], dtype: torch.dtype) -> float:
        """Compile one graph per chain depth (and check that a second batch size reuses
        it). Returns the seconds it took."""
        t0 = time.perf_counter()
        dev = next(self.heads.parameters()).device
        H = self.model.config.hidden_size
        self.dtype = dtype
        for depth in depths:
            if self.save and depth not in self._direct:
                fn = self._saved_or_ahead(depth, torch.zeros(MIN_ROWS, H, dtype=dtype, device=dev))
                if fn is not None:
                    self._direct[depth] = fn
            try:
                for b in (MIN_ROWS, MIN_ROWS + 3):
                    self._run(torch.zeros(b, H, dtype=dtype, device=dev),
                              torch.zeros(b, dtype=torch.long, device=dev),
                              torch.arange(b, device=dev), depth)
            except Exception:
                if depth in self._loaded_keys:  # read from disk and does not run: not again
                    saved_graph.discard(self._loaded_keys[depth], f"draft{depth}")
                raise
            self.depths.add(depth)
            if depth in self._codes and (
                    direct := direct_code(self._codes[depth], ChainBody.body.__globals__)):
                self._direct[depth] = direct
        return time.perf_counter() - t0

    def extend(self, depth: int) -> None:
        """Compile the depths up to `depth` not compiled yet (after warm_up: --tree auto
        compiles each depth as its timing reaches it, then the served tree's). A failure
        logs a warning; those depths draft eagerly."""
        todo = [d for d in range(1, depth + 1) if d not in self.depths]
        if not todo or self.dtype is None:
            return
        try:
            secs = self.warm_up(todo, self.dtype)
        except Exception as e:  # noqa: BLE001 - as compile_draft_chain: eager drafts the same
            log.warning("compiling draft depth(s) %s failed (%s: %s); they draft without "
                        "compilation", todo, type(e).__name__,
                        str(e).splitlines()[0] if str(e) else "")
            return
        log.info("compiled the draft chain's depth(s) %s in %.1f s", todo, secs)


def compile_draft_chain(heads: object, model: nn.Module, mode: str, depths: int,
                        dtype: torch.dtype) -> CompiledDraftChain | None:
    """Compile the drafting of chain-attention sequential heads for depths 1..`depths` and
    hand it to them (`heads.compiled_chain`); other heads, or a failed compile (a
    warning), draft eagerly. Returns the compiled chain, or None."""
    from .mtp_sequential import SequentialMTPHeads

    if not isinstance(heads, SequentialMTPHeads) or heads.context:
        return None
    try:
        chain = CompiledDraftChain(heads, model, mode)
        secs = chain.warm_up(list(range(1, depths + 1)), dtype)
    except Exception as e:  # noqa: BLE001 - inductor fails in many ways; eager drafts the same
        log.warning("compiling the draft chain failed (%s: %s); drafting without compilation",
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return None
    heads.compiled_chain = chain
    log.info("compiled the draft chain in %.1f s (depths 1-%d, %d graph(s)%s)", secs, depths,
             chain.compiles + chain.loaded, f", {chain.loaded} read from disk" if chain.loaded
             else "")
    return chain
