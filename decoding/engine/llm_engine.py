"""The engine: requests in, `RequestOutput` deltas out, one `step()` at a time.

A step is a handful of named phases, each in its own module:

    schedule (scheduler.py) -> prepare (step_inputs.py) -> forward (this file: prefill
    chunks + draft trees, ONE pass) -> logits -> accept and commit KV (commit.py) and emit
    (output_processor.py), per sequence -> draft the next trees (drafter.py)

Emitting precedes drafting: drafting reads the emitted tokens and skips finished requests.
This file keeps what ties them together: the request table, fault isolation
(a failing request fails alone, a failing batch fails its step's requests, EngineBroken
after MAX_FAILED_STEPS_IN_A_ROW) and the auto policy's step timing; engine_setup.py loads
the model and compiles the step.

Single-threaded by design; `runner.EngineRunner` puts it behind a thread-safe API.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

import torch

from ..config import EngineConfig, SamplingParams
from ..model import row_attention
from ..model.attention_metadata import AttentionMetadata
from ..model.batch_invariance import apply_batch_invariant
from ..model.compiled import CompiledTrunk
from ..model.detokenizer import IncrementalDetokenizer
from ..model.device import kv_cache_dtype
from ..model.kv_cache import KVCache
from ..model.tokenizer import Tokenizer
from ..model.trunk import CausalLM
from ..spec.heads import DraftHeads
from ..spec.mtp_context import ModuleContext
from ..spec.mtp_parallel import ParallelMTPHeads
from ..spec.mtp_sequential import SequentialMTPHeads
from ..spec.policy import SpeculationPolicy
from .commit import Committer
from .drafter import DraftBatch, Drafter
from .engine_setup import compile_and_tune, load_model
from .output_processor import OutputProcessor, request_output
from .outputs import EngineStats, RequestOutput
from .scheduler import ScheduledSeq, Scheduler, Sequence, Status
from .step_inputs import StepInputs
from .stop import StopStringMatcher

log = logging.getLogger(__name__)


# A step whose batched work fails fails only its own requests; this many in a row means the
# engine itself is broken (a lost device, exhausted memory): raise so the runner stops and
# /health reports the error, instead of failing every request forever while looking healthy.
MAX_FAILED_STEPS_IN_A_ROW = 8


class EngineBroken(RuntimeError):
    """Raised by `step()` after MAX_FAILED_STEPS_IN_A_ROW consecutive failed steps."""


class LLMEngine:
    def __init__(self, config: EngineConfig, model: CausalLM, tokenizer: Tokenizer,
                 model_name: str, heads: DraftHeads | None = None) -> None:
        self.config = config
        self.model = model
        self.model_config = model.config
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.heads = heads
        prepare = getattr(heads, "prepare", None)  # optional in the DraftHeads protocol
        if prepare is not None:  # draft-vocabulary slices (and int4 drafting) before step 1
            prepare(model)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        # auto picks an fp16 cache where the row kernel (which widens it as it loads) runs
        row_kernel = row_attention.resolve(config.attention_kernel, self.device,
                                           torch.float32) == "rows"
        self.kv_dtype = kv_cache_dtype(self.dtype, self.device, config.kv_cache_dtype,
                                       quantized=model.weight_format != "dense",
                                       row_kernel=row_kernel)
        ctx_dtype = kv_cache_dtype(self.dtype, self.device)  # draft modules' context cache
        self.policy = SpeculationPolicy(config.spec, heads)
        # Meta-style heads are extra blocks in the verify forward, with KV-cache layers.
        self.branch_heads = heads if isinstance(heads, ParallelMTPHeads) else None
        extra_layers = self.branch_heads.kv_layers if self.branch_heads is not None else 0
        self.max_model_len = min(config.max_model_len, self.model_config.max_position_embeddings)
        slot_len = self.max_model_len + self.policy.max_tree_nodes + 1
        # Sequential modules that attend over the context keep their own cache per slot.
        context_modules = (len(heads.mods) if isinstance(heads, SequentialMTPHeads)
                           and heads.context and config.spec.mode != "off"
                           and config.spec.proposer != "ngram" else 0)
        per_token = KVCache.bytes_per_token(self.model_config, self.kv_dtype, extra_layers)
        if context_modules:
            per_token += ModuleContext.bytes_per_token(self.model_config, context_modules,
                                                       ctx_dtype)
        per_slot = per_token * slot_len
        num_slots = config.max_num_seqs
        if config.kv_cache_memory_gb > 0:
            num_slots = min(num_slots, int(config.kv_cache_memory_gb * 2**30 // per_slot))
            if num_slots < 1:
                raise ValueError(
                    f"kv cache budget {config.kv_cache_memory_gb} GB holds no sequence of "
                    f"{self.max_model_len} tokens ({per_slot / 2**20:.1f} MiB each)")
        self.kv = KVCache(self.model_config, num_slots, slot_len, self.kv_dtype, self.device,
                          lazy=True, extra_layers=extra_layers)
        # decode/tree rows' attention: the row kernel where it runs (batch-invariant by
        # construction: --batch-invariant on then costs attention nothing), else SDPA
        model.set_attention_kernel(config.attention_kernel, self.kv_dtype)
        apply_batch_invariant(model, config.batch_invariant)
        self.module_ctx = (ModuleContext(self.model_config, context_modules, num_slots, slot_len,
                                         ctx_dtype, self.device) if context_modules else None)
        self.scheduler = Scheduler(num_slots, config.prefill_chunk_size, config.max_tokens_per_step,
                                   config.prefill_while_decoding)
        self.eos_ids = set(self.model_config.eos_token_ids) | set(tokenizer.eos_token_ids)
        self._seqs: dict[str, Sequence] = {}
        self._seed_rng = random.Random(config.seed)
        self.num_steps = 0
        self.failed_steps_in_a_row = 0
        # the step's phases (see the module docstring)
        self.inputs = StepInputs(self.kv, self.device)
        self.committer = Committer(self.kv, self.policy, config.spec)
        self.output_processor = OutputProcessor(self.eos_ids, self._finish)
        self.drafter = Drafter(self.policy, heads, model, self.module_ctx, self.scheduler)
        # Tests only: raise inside a step. fault_hook(seq) runs in one sequence's own
        # processing (fails that sequence); batch_fault_hook(seqs) runs just before the
        # batched forward (fails every sequence of the step).
        self.fault_hook: Callable[[Sequence], None] | None = None
        self.batch_fault_hook: Callable[[list[Sequence]], None] | None = None
        # --compile on: the trunk's forward (and the draft chain) compiled now; --tree auto
        self.compiled: CompiledTrunk | None = None
        compile_and_tune(self)

    # -- construction ------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: EngineConfig) -> LLMEngine:
        loaded = load_model(config)
        return cls(config, loaded.model, loaded.tokenizer, loaded.name, loaded.heads)

    @property
    def weight_format(self) -> str:
        """dense, int8 or int4: how the trunk's projections are stored."""
        return self.model.weight_format

    @property
    def speculation_available(self) -> bool:
        return self.config.spec.mode != "off"

    @property
    def generated_tokens(self) -> int:
        """Output tokens emitted over the engine's life."""
        return self.output_processor.generated_tokens

    # -- request API (engine thread only; see runner.py) ----------------------------------
    def validate_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"this model's maximum context length is {self.max_model_len} tokens; the "
                f"prompt has {len(prompt_ids)} tokens and max_tokens is {params.max_tokens} "
                f"({len(prompt_ids) + params.max_tokens} in total)")

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        self.validate_request(prompt_ids, params)
        if request_id in self._seqs:
            raise ValueError(f"duplicate request id {request_id!r}")
        gen = torch.Generator(device=self.device)
        gen.manual_seed(params.seed if params.seed is not None else self._seed_rng.getrandbits(63))
        penalties = params.presence_penalty != 0 or params.frequency_penalty != 0
        speculate = self.policy.enabled_for(params) and not penalties
        seq = Sequence(
            request_id=request_id,
            prompt_len=len(prompt_ids),
            token_ids=list(prompt_ids),
            params=params,
            rule=params.resolved_acceptance(self.config.spec.default_acceptance),
            speculate=speculate,
            detok=IncrementalDetokenizer(self.tokenizer, list(prompt_ids)),
            stops=StopStringMatcher(params.stop) if params.stop else None,
            generator=gen,
        )
        seq.spec.acceptance_rule = seq.rule if speculate else "none"
        self._seqs[request_id] = seq
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> list[RequestOutput]:
        seq = self._seqs.get(request_id)
        if seq is None:
            return []
        self._finish(seq)
        return [request_output(seq, [], "", "abort")]

    def has_unfinished(self) -> bool:
        return bool(self._seqs)

    def stats(self) -> EngineStats:
        used = self.kv.num_slots - self.kv.num_free
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=used / self.kv.num_slots,
            num_steps=self.num_steps,
            generated_tokens=self.generated_tokens,
        )

    # -- the step ----------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """schedule -> prepare -> forward -> logits -> accept and commit, emit (per
        sequence, each failing alone) -> draft the next trees. A failure of the batched work
        fails this step's requests; MAX_FAILED_STEPS_IN_A_ROW of them raise EngineBroken."""
        batch = self._schedule()
        if not batch:
            return []
        self.num_steps += 1
        outputs: list[RequestOutput] = []
        try:
            self._run_batch(batch, outputs)
        except Exception as exc:  # shared work failed: fail this step's requests, keep serving
            log.exception("engine step %d failed; failing its %d request(s)",
                          self.num_steps, len(batch))
            outputs.extend(self._fail_batch(batch, exc))
            self.failed_steps_in_a_row += 1
            if self.failed_steps_in_a_row >= MAX_FAILED_STEPS_IN_A_ROW:
                raise EngineBroken(f"{self.failed_steps_in_a_row} engine steps in a row failed; "
                                   f"last: {type(exc).__name__}: {exc}") from exc
            return outputs
        self.failed_steps_in_a_row = 0
        return outputs

    def _run_batch(self, batch: list[ScheduledSeq], outputs: list[RequestOutput]) -> None:
        """One step over a scheduled batch; appends each output to `outputs` as soon as it
        exists, so a later fault in the step does not lose outputs already final."""
        t_start = time.perf_counter()
        ids, meta, logit_rows = self._prepare(batch)
        if self.batch_fault_hook is not None:
            self.batch_fault_hook([item.seq for item in batch])
        hidden, draft_src = self._forward(ids, meta)
        logits = self._logits(hidden, logit_rows)
        drafts = self._accept_commit_emit(batch, logits, outputs)
        self.drafter.draft_next(drafts, draft_src)
        if all(item.tree is not None for item in batch):  # decode-only steps teach auto
            # Timed after drafting, so the heads' own cost is part of a speculative step.
            self.policy.observe_step(int(ids.numel()), time.perf_counter() - t_start)

    def _schedule(self) -> list[ScheduledSeq]:
        """Admit waiting requests into free cache slots; compose this step's batch."""
        self.scheduler.admit(self.kv.allocate)
        return self.scheduler.schedule()

    def _prepare(self, batch: list[ScheduledSeq]
                 ) -> tuple[torch.Tensor, AttentionMetadata, torch.Tensor]:
        """Host-side inputs of the packed forward: (token ids, metadata, logit rows)."""
        return self.inputs.prepare(batch)

    def _forward(self, ids: torch.Tensor, meta: AttentionMetadata
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass over every row -> (final-normed hidden [T, H], the rows heads draft
        from: the same hidden, or for Meta-style heads their blocks' outputs [T, n, H],
        computed from the residual entering the last layer in this same pass)."""
        out = self.compiled(ids, meta, self.kv) if self.compiled is not None else None
        if self.branch_heads is None:
            hidden = out if out is not None else self.model(ids, meta, self.kv)
            return hidden, hidden
        hidden, pre_last = (out if out is not None
                            else self.model(ids, meta, self.kv, return_pre_last=True))
        return hidden, self.branch_heads.branch(pre_last, self.model, meta, self.kv)

    def _logits(self, hidden: torch.Tensor, logit_rows: torch.Tensor) -> torch.Tensor | None:
        """Logits of the rows that need them (none: a step of mid-prompt chunks only)."""
        return self.model.compute_logits(hidden[logit_rows]) if logit_rows.numel() else None

    def _accept_commit_emit(self, batch: list[ScheduledSeq], logits: torch.Tensor | None,
                            outputs: list[RequestOutput]) -> DraftBatch:
        """Per sequence, in batch order: commit a mid-prompt chunk, or accept its tokens,
        commit their KV and emit its output (a failure there fails that request alone).
        Returns what drafting needs: the sequences that go on and their rows."""
        drafts = self.drafter.new_batch()
        # greedy rows' argmax in one pass over the step's logits (one call per sequence
        # cost ~45 us each at 16 sequences)
        argmax = (logits.argmax(-1).tolist() if logits is not None
                  and any(item.seq.params.greedy for item in batch) else None)
        row = 0  # logits row of the item
        offset = 0  # hidden row of the item's first token
        for item in batch:
            seq, n, start = item.seq, len(item.tokens), item.seq.num_cached
            if not item.needs_logits:  # a prefill chunk mid-prompt
                self.committer.commit_chunk(item)
                drafts.add_chunk(seq, start, offset, n)
                offset += n
                continue
            rows = 1 if item.tree is None else n
            seq_logits = logits[row:row + rows]
            try:
                if self.fault_hook is not None:
                    self.fault_hook(seq)
                verdict = self.committer.accept(
                    item, seq_logits, None if argmax is None else argmax[row:row + rows])
                out, path = self.output_processor.emit(seq, verdict), verdict.path
            except Exception as exc:  # one bad request fails alone
                log.exception("request %s failed", seq.request_id)
                self._finish(seq)
                out, path = request_output(seq, [], "", "error", error=str(exc)), []
            outputs.append(out)
            if path and seq.status is Status.RUNNING:
                drafts.add(seq, start, offset, n, path, prefill=item.tree is None)
            row += rows
            offset += n
        return drafts

    def _fail_batch(self, batch: list[ScheduledSeq], exc: Exception) -> list[RequestOutput]:
        """Finish every sequence of a failed step with an error (freeing its slot). Those
        that finished earlier in the step keep their output; waiting ones are untouched."""
        message = f"engine step failed: {type(exc).__name__}: {exc}"
        failed: list[RequestOutput] = []
        for item in batch:
            seq = item.seq
            if seq.status is Status.FINISHED:  # earlier in this step: its output stands
                continue
            self._finish(seq)
            failed.append(request_output(seq, [], "", "error", error=message))
        return failed

    # -- bookkeeping -------------------------------------------------------------------
    def _finish(self, seq: Sequence) -> None:
        if seq.status is Status.FINISHED:
            return
        self.scheduler.remove(seq)
        if seq.slot is not None:
            self.kv.free(seq.slot)
            if self.module_ctx is not None:
                self.module_ctx.reset(seq.slot)
            seq.slot = None
        seq.status = Status.FINISHED
        self._seqs.pop(seq.request_id, None)

    # -- offline convenience -------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
                 ) -> list[dict]:
        """Run prompts to completion (offline / tests). Returns per prompt its token ids,
        text, finish reason, spec stats and wall time."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        results: dict[str, dict] = {}
        base = f"gen-{time.monotonic_ns()}-"
        for i, (ids, p) in enumerate(zip(prompts, plist)):
            rid = base + str(i)
            self.add_request(rid, ids, p)
            results[rid] = {"token_ids": [], "text": "", "finish_reason": None, "steps": 0}
        t0 = time.perf_counter()
        while self.has_unfinished():
            for out in self.step():
                r = results.get(out.request_id)
                if r is None:
                    continue
                r["token_ids"].extend(out.new_token_ids)
                r["text"] += out.new_text
                r["steps"] += 1
                if out.finished:
                    r["finish_reason"] = out.finish_reason
                    r["spec"] = out.spec
                    r["error"] = out.error
                    r["seconds"] = time.perf_counter() - t0
        return [results[base + str(i)] for i in range(len(prompts))]
