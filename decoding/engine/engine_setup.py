"""Setting an engine up: the model loaded in the served format (`load_model`: read back as
a previous start prepared it, model/prepared_cache.py, else `prepare_model`), then, once
the engine holds its cache, the step compiled and the draft tree chosen for this machine
(`compile_and_tune`).

`LLMEngine.from_config` is `load_model` + the constructor, which calls `compile_and_tune`
last, so engines built around a model directly (tests, train-heads) set up the same way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from ..config import EngineConfig
from ..model import prepared_cache
from ..model.checkpoint import default_model_path, load_checkpoint
from ..model.compiled import CompiledTrunk, compile_wanted, use_user_cache_dir
from ..model.device import (
    cpu_has_native_bf16,
    malloc_trim,
    resolve_device,
    resolve_dtype,
    resolve_weights,
)
from ..model.kernel_build import cpu_kernels, prebuild
from ..model.tokenizer import Tokenizer
from ..model.trunk import CausalLM, RotaryEmbedding
from ..model.trunk_weights import load_trunk_weights
from ..spec.compiled_draft import WARM_DEPTHS, compile_draft_chain
from ..spec.heads import DraftHeads
from ..spec.heads_io import load_heads_for
from ..spec.tree_choice import tree_depth
from .tree_autotune import cached_tree, tree_for_this_machine

# `engine` below is an LLMEngine, not imported: llm_engine imports this module

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: CausalLM
    tokenizer: Tokenizer
    name: str
    heads: DraftHeads | None
    from_cache: bool = False  # read back prepared (prepared_cache.py), not from the checkpoint


def load_model(config: EngineConfig) -> LoadedModel:
    """The checkpoint and heads `config` names, on its device, in the served weight format:
    on CPU read back as a previous start prepared it when that is still valid."""
    if config.compile != "off":  # before the kernel builds pin inductor's default folder
        use_user_cache_dir()
    device = resolve_device(config.device)
    path = config.model or default_model_path()
    key = None
    if device.type == "cpu":
        settings = {f: getattr(config, f) for f in PREPARED_SETTINGS}
        try:
            key = prepared_cache.prepared_key(settings, path)
        except OSError:  # no such checkpoint: load_checkpoint says so in its own words
            key = None
    entry = prepared_cache.load_entry(key, lambda w: _facts(config, w)) if key else None
    if entry is not None:
        model, tokenizer, name, path = entry["model"], entry["tokenizer"], entry["name"], entry["path"]
        prepared_cache.realign(model)
    else:
        model, tokenizer, name, path = prepare_model(config, device, path)
        if key and prepared_cache.worth_keeping(model):
            prepared_cache.save_entry(key, _facts(config, model.weight_format), {
                "weights": model.weight_format, "model": model, "tokenizer": tokenizer,
                "name": name, "path": path})
    dtype = resolve_dtype(config.dtype, device, model.weight_format)
    heads = load_heads_for(config.spec, model.config, path, device, dtype)
    malloc_trim()
    return LoadedModel(model, tokenizer, name, heads, from_cache=entry is not None)


# EngineConfig fields prepare_model reads: a prepared model is reused only under the same
PREPARED_SETTINGS = ("model", "dtype", "weights", "int4_kernel", "unembed", "wide_weights",
                     "max_model_len")


def _facts(config: EngineConfig, weights: str) -> dict:
    return prepared_cache.machine_facts(weights, config.int4_kernel, config.unembed)


def prepare_model(config: EngineConfig, device: torch.device, path: str
                  ) -> tuple[CausalLM, Tokenizer, str, str]:
    """The checkpoint at `path` loaded, quantized and packed as `config` serves it ->
    (model, tokenizer, model name, checkpoint path)."""
    # CPU: load in fp32 so quantizing recovers the file's own codes (bf16 would round
    # the dequantized GGUF values first); the compute dtype follows the weight format.
    load_dtype = torch.float32 if device.type == "cpu" else resolve_dtype(config.dtype, device)
    ckpt = load_checkpoint(path, dtype=load_dtype)
    weights = resolve_weights(config.weights, device, ckpt.trunk_quant)
    built = prebuild(cpu_kernels(weights, config.int4_kernel, config.unembed,
                                 config.attention_kernel) if device.type == "cpu" else [])
    dtype = resolve_dtype(config.dtype, device, weights)
    max_pos = min(config.max_model_len, ckpt.config.max_position_embeddings) + 256
    # Build on the meta device and fill from the checkpoint: no random init, and
    # load_trunk_weights frees each source tensor as it goes, so peak memory stays ~2x weights.
    with torch.device("meta"):
        model = CausalLM(ckpt.config, max_positions=max_pos)
    model.to_empty(device=device)
    model.to(dtype)
    model.rope = RotaryEmbedding(ckpt.config, max_pos).to(device)  # fp32 tables
    try:
        load_trunk_weights(model, ckpt.tensors)
    except ValueError as exc:
        raise ValueError(f"{ckpt.path}: {exc}") from None
    ckpt.tensors = {}
    built()  # the kernels, built meanwhile, before the first one is loaded
    if weights in ("int8", "int4"):
        # Where the CPU multiplies bf16 natively, a bf16 copy of the quantized values
        # (+2 bytes per weight) serves passes of many rows ~2x faster than the kernels.
        # (the batch-invariant mode uses it only for prefill chunks, each alone: its GEMM
        # is a different kernel per row count, linear.ChunkRows)
        wide = config.wide_weights and device.type == "cpu" and cpu_has_native_bf16()
        model.quantize(weights, wide_copy=wide, int4_kernel=config.int4_kernel)
    # before use_transposed_weights, which then keeps no fp32 copy for the logits
    auto = config.unembed == "auto" and device.type == "cpu" and weights in ("int8", "int4")
    if config.unembed == "q8" or auto:
        if not model.use_q8_unembedding() and config.unembed == "q8":
            raise ValueError("unembed q8 needs the Q8 unembedding kernel on CPU (x86-64 with "
                             "AVX-512F or AVX2, a C++ compiler; see the warning above) and "
                             "an unembedding stored as GGUF Q8_0; use --unembed fp16 or fp32")
    if config.unembed == "fp16" or (auto and model.unembed_q8 is None):
        if not model.use_fp16_unembedding() and config.unembed == "fp16":
            raise ValueError("unembed fp16 needs PyTorch's FBGEMM fp16 GEMM on CPU with an "
                             f"fp32 unembedding (device {device.type}); use --unembed fp32")
    if device.type == "cpu":
        model.use_transposed_weights()
    model.eval()
    return model, ckpt.tokenizer, ckpt.name, ckpt.path


def compile_and_tune(engine: Any) -> None:
    """--compile: the trunk's graph, then the draft chain's depth graphs the tree needs;
    --tree auto: the tree for this machine (timed on the compiled step, or cached)."""
    config, heads = engine.config, engine.heads
    speculating = heads is not None and config.spec.mode != "off"
    auto = speculating and config.spec.tree == "auto"
    chain = None
    if compile_wanted(config.compile, engine.device.type, engine.model.weight_format):
        engine.compiled = compile_trunk(engine)
        if speculating:  # before --tree auto times it
            # --tree auto with this machine's choice cached: its depths (a chain2 compiles 2
            # depth graphs, not 4); measuring: depth 1, and each deeper one only when the
            # timing reaches it (it stops where no deeper tree can pay); else the tree's
            known = cached_tree(engine, True) if auto else None
            depth = (tree_depth(known) if known else 1 if auto else
                     max(WARM_DEPTHS, tree_depth(engine.policy.choices)))
            chain = compile_draft_chain(heads, engine.model, config.compile_mode, depth,
                                        engine.dtype)
    if auto:
        # after compiling: it times the real step
        choices = tree_for_this_machine(engine, chain.extend if chain is not None else None)
        if choices:
            engine.policy.set_choices(choices)
    if chain is not None:  # the served tree's depths (--tree auto's fallback: the default)
        chain.extend(tree_depth(engine.policy.choices))


def compile_trunk(engine: Any) -> CompiledTrunk | None:
    """Compile the trunk's graph now, on a free cache slot. A failure logs a warning and
    the engine serves eagerly (the same outputs, slower): never a crash at startup."""
    try:
        compiled = CompiledTrunk(engine.model, engine.config.compile_mode,
                                 return_pre_last=engine.branch_heads is not None)
        slot = engine.kv.allocate()
        try:
            secs = compiled.warm_up(engine.kv, slot, log.info)
        finally:
            engine.kv.free(slot)
    except Exception as e:  # noqa: BLE001 - inductor fails in many ways; eager is correct
        log.warning("compiling the trunk failed (%s: %s); serving without compilation",
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return None
    log.info("compiled the trunk in %.1f s (%d graph(s) for every row count%s%s)", secs,
             compiled.compiles + compiled.loaded, ", read from disk" if compiled.loaded else "",
             "" if compiled.eager_from is None else
             f"; passes of {compiled.eager_from}+ rows eager: bf16 wide copies")
    return compiled
