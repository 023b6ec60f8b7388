"""`mtpserve serve --backend vllm`: vLLM's async engine (`vllm.v1.engine.async_llm.AsyncLLM`)
behind the same routes, validation, errors, auth, metrics and per-request speculation stats.

This module holds `VllmBackend`: AsyncLLM's lifecycle on its own event loop thread and
the request plumbing. The rest of the backend is split by what it does:
- vllm_options.py: flags -> `VllmOptions`, startup refusals, `import_vllm()`;
- vllm_export.py: the model and heads folders vLLM loads (exported once, cached);
- vllm_requests.py: per-request refusals, SamplingParams -> vLLM's, vLLM outputs -> ours.

vLLM is imported only by `VllmBackend.start()` (and what it calls) and `import_vllm()`;
these modules import without it, so `server/` works and tests run where vLLM is not
installed.

What maps onto what (`options_from_args`, `engine_args`):
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

import asyncio
import logging
import os
import threading
from pathlib import Path
from typing import Any

from mtpserve.decoding.config import SamplingParams
from mtpserve.decoding.engine.outputs import EngineStats, RequestOutput

from .engine_api import EngineBackend, OutputCallback, UnsupportedRequest
from .vllm_export import default_cache_dir, prepare_heads, prepare_model
from .vllm_options import NGRAM, BackendConfigError, VllmOptions, import_vllm
from .vllm_requests import (RequestState, check_vllm_request, to_request_output,
                            to_vllm_sampling_params)

log = logging.getLogger(__name__)

CPU_KVCACHE_ENV = "VLLM_CPU_KVCACHE_SPACE"
DEFAULT_CPU_KVCACHE_GIB = "1"


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
        sp = to_vllm_sampling_params(params)
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

    async def _pump(self, rid: str, ids: list[int], params: SamplingParams, sp: Any,
                    on_output: OutputCallback) -> None:
        from vllm.inputs import TokensPrompt

        st = RequestState(len(ids), params)
        try:
            async for out in self.llm.generate(TokensPrompt(prompt_token_ids=ids), sp, rid):
                on_output(to_request_output(rid, out, st, self.speculation_available))
                if out.finished:
                    return
        except asyncio.CancelledError:
            raise  # aborted by the server (stream closed): nobody waits for an output
        except Exception as exc:
            log.exception("vLLM request %s failed", rid)
            on_output(RequestOutput(rid, [], "", st.num_prompt, st.num_output, finished=True,
                                    finish_reason="error", error=f"vLLM: {exc!r}"))
