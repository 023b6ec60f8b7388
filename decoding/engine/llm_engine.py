"""The engine: `step()` = schedule -> forward (prefill chunks + draft trees, ONE pass) ->
accept -> commit KV -> emit -> draft the next trees.

Single-threaded by design; `runner.EngineRunner` puts it behind a thread-safe API.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Callable

import torch

from ..config import EngineConfig, SamplingParams
from ..model.attention import AttentionMetadata, padded_layout
from ..model.checkpoint import load_checkpoint
from ..model.device import (cpu_has_native_bf16, kv_cache_dtype, malloc_trim, resolve_device,
                            resolve_dtype, resolve_weights)
from ..model.kv_cache import KVCache
from ..model.tokenizer import IncrementalDetokenizer, Tokenizer
from ..model.trunk import CausalLM, RotaryEmbedding
from ..spec.acceptance import Accepted, accept_greedy, accept_rejection, accept_typical
from ..spec.heads import DraftHeads, load_heads_for
from ..spec.mtp_context import ModuleContext, NewEntries, write_and_draft
from ..spec.mtp_parallel import ParallelMTPHeads
from ..spec.mtp_sequential import SequentialMTPHeads
from ..spec.policy import SpeculationPolicy
from ..spec.proposers import ngram_propose
from ..spec.sampling import apply_penalties, processed_probs, sample
from ..spec.tree import DraftTree
from .outputs import EngineStats, RequestOutput, TokenLogprob
from .scheduler import ScheduledSeq, Scheduler, Sequence, Status
from .stop import StopStringMatcher

log = logging.getLogger(__name__)


# A step whose batched work fails fails only its own requests; this many in a row means the
# engine itself is broken (a lost device, exhausted memory): raise so the runner stops and
# /health reports the error, instead of failing every request forever while looking healthy.
MAX_FAILED_STEPS_IN_A_ROW = 8


class EngineBroken(RuntimeError):
    """Raised by `step()` after MAX_FAILED_STEPS_IN_A_ROW consecutive failed steps."""


def _attention_groups(batch: list[ScheduledSeq]) -> list[list[int]]:
    """Indices of `batch` attended together: every prefill chunk of 2+ tokens alone, the
    rest (decodes, draft trees, one-token chunks) as one padded batch. One group = no split."""
    chunks = [[i] for i, b in enumerate(batch) if b.tree is None and len(b.tokens) > 1]
    rest = [i for i, b in enumerate(batch) if not (b.tree is None and len(b.tokens) > 1)]
    return chunks + ([rest] if rest else [])


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
        self.kv_dtype = kv_cache_dtype(self.dtype, self.device)
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
                                                       self.kv_dtype)
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
        self.module_ctx = (ModuleContext(self.model_config, context_modules, num_slots, slot_len,
                                         self.kv_dtype, self.device) if context_modules else None)
        self.scheduler = Scheduler(num_slots, config.prefill_chunk_size, config.max_tokens_per_step,
                                   config.prefill_while_decoding)
        self.eos_ids = set(self.model_config.eos_token_ids) | set(tokenizer.eos_token_ids)
        self._seqs: dict[str, Sequence] = {}
        self._seed_rng = random.Random(config.seed)
        self.num_steps = 0
        self.failed_steps_in_a_row = 0
        self.generated_tokens = 0
        # Tests only: raise inside a step. fault_hook(seq) runs in one sequence's own
        # processing (fails that sequence); batch_fault_hook(seqs) runs just before the
        # batched forward (fails every sequence of the step).
        self.fault_hook: Callable[[Sequence], None] | None = None
        self.batch_fault_hook: Callable[[list[Sequence]], None] | None = None

    # -- construction ------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: EngineConfig) -> LLMEngine:
        device = resolve_device(config.device)
        # CPU: load in fp32 so quantizing recovers the file's own codes (bf16 would round
        # the dequantized GGUF values first); the compute dtype follows the weight format.
        load_dtype = torch.float32 if device.type == "cpu" else resolve_dtype(config.dtype, device)
        ckpt = load_checkpoint(config.model, dtype=load_dtype)
        weights = resolve_weights(config.weights, device, ckpt.trunk_quant)
        dtype = resolve_dtype(config.dtype, device, weights)
        max_pos = min(config.max_model_len, ckpt.config.max_position_embeddings) + 256
        # Build on the meta device and fill from the checkpoint: no random init, and
        # load_weights frees each source tensor as it goes, so peak memory stays ~2x weights.
        with torch.device("meta"):
            model = CausalLM(ckpt.config, max_positions=max_pos)
        model.to_empty(device=device)
        model.to(dtype)
        model.rope = RotaryEmbedding(ckpt.config, max_pos).to(device)  # fp32 tables
        try:
            model.load_weights(ckpt.tensors)
        except ValueError as exc:
            raise ValueError(f"{ckpt.path}: {exc}") from None
        ckpt.tensors = {}
        ckpt_tokenizer, ckpt_name = ckpt.tokenizer, ckpt.name
        if weights in ("int8", "int4"):
            # Where the CPU multiplies bf16 natively, a bf16 copy of the quantized values
            # (+2 bytes per weight) serves passes of many rows ~2x faster than the kernels.
            wide = config.wide_weights and device.type == "cpu" and cpu_has_native_bf16()
            model.quantize(weights, wide_copy=wide)
        if config.unembed == "fp16" or (config.unembed == "auto" and device.type == "cpu"
                                        and weights in ("int8", "int4")):
            # before use_transposed_weights, which then keeps no fp32 copy for the logits
            if not model.use_fp16_unembedding() and config.unembed == "fp16":
                raise ValueError("unembed fp16 needs PyTorch's FBGEMM fp16 GEMM on CPU with an "
                                 f"fp32 unembedding (device {device.type}); use --unembed fp32")
        if device.type == "cpu":
            model.use_transposed_weights()
        model.eval()
        heads = load_heads_for(config.spec, ckpt.config, ckpt.path, device, dtype)
        del ckpt
        malloc_trim()
        return cls(config, model, ckpt_tokenizer, ckpt_name, heads)

    @property
    def weight_format(self) -> str:
        """dense, int8 or int4: how the trunk's projections are stored."""
        return self.model.weight_format

    @property
    def speculation_available(self) -> bool:
        return self.config.spec.mode != "off"

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
        return [self._output(seq, [], "", "abort")]

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
        self.scheduler.admit(self.kv.allocate)
        batch = self.scheduler.schedule()
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
        logits = self.model.compute_logits(hidden[logit_rows]) if logit_rows.numel() else None
        row = 0
        last_rows: list[int] = []  # hidden row of each sequence's last accepted node
        drafting: list[Sequence] = []
        committed: dict[int, NewEntries] = {}  # module entries to write (context heads)
        offset = 0
        for item in batch:
            seq = item.seq
            n = len(item.tokens)
            start = seq.num_cached
            if not item.needs_logits:  # a prefill chunk mid-prompt
                seq.num_cached += n
                if self.module_ctx is not None and seq.speculate:
                    committed[id(seq)] = NewEntries(seq.slot, start, list(range(offset, offset + n)),
                                                    seq.token_ids[start + 1:start + n + 1],
                                                    prefill=True)
                offset += n
                continue
            rows = 1 if item.tree is None else n
            seq_logits = logits[row:row + rows]
            try:
                if self.fault_hook is not None:
                    self.fault_hook(seq)
                out, path = self._accept_and_emit(item, seq_logits)
            except Exception as exc:  # one bad request fails alone
                log.exception("request %s failed", seq.request_id)
                self._finish(seq)
                out, path = self._output(seq, [], "", "error", error=str(exc)), []
            outputs.append(out)
            if path and seq.status is Status.RUNNING:
                last_rows.append(offset + (n - 1 if item.tree is None else path[-1]))
                drafting.append(seq)
                if self.module_ctx is not None and seq.speculate:
                    prefill = item.tree is None
                    nodes = list(range(n)) if prefill else path  # now committed
                    committed[id(seq)] = NewEntries(
                        seq.slot, start, [offset + j for j in nodes],
                        seq.token_ids[start + 1:start + len(nodes) + 1], prefill=prefill)
            row += rows
            offset += n
        self._draft_next(drafting, draft_src, last_rows, committed)
        if all(item.tree is not None for item in batch):  # decode-only steps teach auto
            # Timed after drafting, so the heads' own cost is part of a speculative step.
            self.policy.observe_step(int(ids.numel()), time.perf_counter() - t_start)

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
            failed.append(self._output(seq, [], "", "error", error=message))
        return failed

    def _forward(self, ids: torch.Tensor, meta: AttentionMetadata
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass over every row -> (final-normed hidden [T, H], the rows heads draft
        from: the same hidden, or for Meta-style heads their blocks' outputs [T, n, H],
        computed from the residual entering the last layer in this same pass)."""
        if self.branch_heads is None:
            hidden = self.model(ids, meta, self.kv)
            return hidden, hidden
        hidden, pre_last = self.model(ids, meta, self.kv, return_pre_last=True)
        return hidden, self.branch_heads.branch(pre_last, self.model, meta, self.kv)

    def _prepare(self, batch: list[ScheduledSeq]
                 ) -> tuple[torch.Tensor, AttentionMetadata, torch.Tensor]:
        """Host-side metadata for one packed forward (one transfer per tensor)."""
        ids: list[int] = []
        positions: list[int] = []
        tslots: list[int] = []
        tstore: list[int] = []
        logit_rows: list[int] = []
        masks: list[torch.Tensor] = []  # per item: [n, n] mask over its own new tokens
        for item in batch:
            seq, n, start = item.seq, len(item.tokens), item.seq.num_cached
            base = len(ids)
            ids.extend(item.tokens)
            tslots.extend([seq.slot] * n)
            tstore.extend(range(start, start + n))
            if item.tree is not None:
                positions.extend(start + d for d in item.tree.depths)
                masks.append(item.tree.ancestor_mask())
                logit_rows.extend(range(base, base + n))
            else:
                positions.extend(range(start, start + n))
                masks.append(torch.ones(n, n, dtype=torch.bool).tril_())
                if item.needs_logits:
                    logit_rows.append(base + n - 1)
        kv_len = max(b.seq.num_cached + len(b.tokens) for b in batch)
        for item in batch:
            self.kv.ensure_initialized(item.seq.slot, kv_len)
        as_t = lambda xs: torch.tensor(xs, dtype=torch.long, device=self.device)  # noqa: E731
        groups = _attention_groups(batch)
        # one group: the step's own layout; several: each group's, the step's left unpadded
        meta = self._attention_meta(batch, masks, layout=len(groups) == 1)
        meta.positions, meta.token_slots, meta.token_store = (as_t(positions), as_t(tslots),
                                                              as_t(tstore))
        if len(groups) > 1:
            bases = [0]
            for item in batch:
                bases.append(bases[-1] + len(item.tokens))
            meta.groups = []
            for members in groups:
                g = self._attention_meta([batch[i] for i in members], [masks[i] for i in members])
                g.rows = as_t([r for i in members for r in range(bases[i], bases[i + 1])])
                meta.groups.append(g)
        return as_t(ids), meta, as_t(logit_rows)

    def _attention_meta(self, items: list[ScheduledSeq], masks: list[torch.Tensor],
                        layout: bool = True) -> AttentionMetadata:
        """What attention needs for these sequences (in slot order): their cache rows, the
        padded query layout and the mask (committed prefix + each item's own mask); without
        `layout` only the cache rows (a step that attends in groups)."""
        B = len(items)
        counts = [len(b.tokens) for b in items]
        q_len = max(counts)
        kv_len = max(b.seq.num_cached + len(b.tokens) for b in items)
        mask = None
        if layout and (B > 1 or q_len > 1):
            mask = torch.zeros(B, 1, q_len, kv_len, dtype=torch.bool)
            for b, (item, own) in enumerate(zip(items, masks)):
                n, start = counts[b], item.seq.num_cached
                mask[b, 0, :n, :start] = True
                mask[b, 0, :n, start:start + n] = own
                mask[b, 0, n:, 0] = True  # padding rows: attend somewhere, result dropped
        dev = self.device
        slots = [item.seq.slot for item in items]
        contiguous = slots == list(range(slots[0], slots[0] + B))
        q_gather, q_scatter = padded_layout(counts, dev) if layout else (None, None)
        empty = torch.empty(0, dtype=torch.long, device=dev)
        return AttentionMetadata(
            positions=empty, token_slots=empty, token_store=empty,  # the step's: see _prepare
            seq_slots=torch.tensor(slots, dtype=torch.long, device=dev),
            slot_start=slots[0] if contiguous else None,
            kv_len=kv_len,
            num_seqs=B,
            q_len=q_len,
            q_gather=q_gather,
            q_scatter=q_scatter,
            mask=None if mask is None else mask.to(dev),
        )

    def _accept_and_emit(self, item: ScheduledSeq, logits: torch.Tensor
                         ) -> tuple[RequestOutput, list[int]]:
        """Accept (decode) or sample the first token (prefill end); commit KV; emit.
        Returns the output and the accepted path (tree nodes, root first)."""
        seq, params = item.seq, item.seq.params
        tree = item.tree
        if tree is None:  # last prefill chunk: its final row predicts the first output token
            seq.num_cached += len(item.tokens)
            tree = DraftTree.root_only(seq.token_ids[-1])
        else:
            seq.draft = None
        if seq.output_ids and (params.presence_penalty or params.frequency_penalty):
            out_ids = torch.tensor(seq.output_ids, device=logits.device)
            logits = apply_penalties(logits, out_ids, params)
        if item.tree is None:
            acc = self._accept(seq, logits, tree)
        else:
            acc = self._accept(seq, logits, tree)
            start = seq.num_cached
            self.kv.keep_path(seq.slot, [start + j for j in acc.path], start)
            seq.num_cached += len(acc.path)
            seq.spec.record_step(tree.max_depth, tree.num_drafts, acc.num_accepted)
            if tree.num_drafts:
                self.policy.observe_acceptance(tree.max_depth, acc.num_accepted)
        new_tokens = [tree.tokens[j] for j in acc.path[1:]] + [acc.bonus]
        return self._emit(seq, new_tokens, logits, acc.path), acc.path

    def _accept(self, seq: Sequence, logits: torch.Tensor, tree: DraftTree) -> Accepted:
        p = seq.params
        if p.greedy:
            return accept_greedy(logits, tree)
        probs = processed_probs(logits, p)
        if tree.num_drafts == 0:
            return Accepted([0], int(sample(probs[0], seq.generator).item()))
        if seq.rule == "rejection":
            return accept_rejection(probs, tree, seq.generator)
        eps = p.typical_epsilon if p.typical_epsilon is not None else self.config.spec.typical_epsilon
        delta = p.typical_delta if p.typical_delta is not None else self.config.spec.typical_delta
        return accept_typical(probs, tree, eps, delta, seq.generator)

    def _emit(self, seq: Sequence, new_tokens: list[int], logits: torch.Tensor,
              path: list[int]) -> RequestOutput:
        """Append tokens one by one, honouring EOS, stop ids, stop strings and max_tokens
        exactly: nothing past the stop point is emitted or counted."""
        p = seq.params
        kept: list[int] = []
        text_parts: list[str] = []
        reason: str | None = None
        stop_reason: str | int | None = None
        for tok in new_tokens:
            kept.append(tok)
            seq.token_ids.append(tok)
            seq.num_emitted += 1
            piece = seq.detok.add([tok])
            if seq.stops is not None:
                piece, hit, matched = seq.stops.feed(piece)
                text_parts.append(piece)
                if hit:
                    reason, stop_reason = "stop", matched
                    break
            else:
                text_parts.append(piece)
            if tok in p.stop_token_ids:
                reason, stop_reason = "stop", tok
            elif tok in self.eos_ids and not p.ignore_eos:
                reason = "stop"
            elif seq.num_emitted >= p.max_tokens:
                reason = "length"
            if reason is not None:
                text_parts.append(self._flush_text(seq))
                break
        self.generated_tokens += len(kept)
        logprobs = self._logprobs(logits, path, kept, p.logprobs) if p.logprobs is not None else None
        if reason is not None:
            self._finish(seq)
        out = self._output(seq, kept, "".join(text_parts), reason, stop_reason)
        out.logprobs = logprobs
        return out

    @staticmethod
    def _flush_text(seq: Sequence) -> str:
        """End of generation without a stop string: release held-back text."""
        tail = seq.detok.flush()
        if seq.stops is None:
            return tail
        tail, hit, _ = seq.stops.feed(tail)
        return tail if hit else tail + seq.stops.flush()

    def _logprobs(self, logits: torch.Tensor, path: list[int], kept: list[int], k: int
                  ) -> list[TokenLogprob]:
        """Raw-model logprobs of each emitted token; row path[i] predicted token i."""
        rows = torch.tensor(path[:len(kept)], device=logits.device)
        lp = torch.log_softmax(logits[rows].float(), dim=-1)
        chosen = lp.gather(1, torch.tensor(kept, device=lp.device)[:, None])[:, 0].tolist()
        k = min(k, lp.shape[-1])
        top_v, top_i = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
        tv, ti = top_v.tolist(), top_i.tolist()
        return [TokenLogprob(t, c, list(zip(ti[i], tv[i]))) for i, (t, c) in enumerate(zip(kept, chosen))]

    def _draft_next(self, seqs: list[Sequence], hidden: torch.Tensor, rows: list[int],
                    committed: dict[int, NewEntries]) -> None:
        """Build each speculating sequence's tree for the next step. hidden: the rows the
        heads draft from (see _forward); rows: each sequence's last accepted row;
        committed: each sequence's new module entries (context-attending heads only)."""
        spec_seqs = [s for s in seqs if s.speculate]
        depths = self.policy.draft_depths(len(self.scheduler.running), len(spec_seqs)) if seqs else []
        # Heads run only for the sequences that draft this step (often one probe, or none).
        with_heads = [(s, d) for s, d in zip(spec_seqs, depths) if self.policy.use_heads(d)]
        head_cands: dict[int, list[list[int]]] = {}
        # depths the heads must draft: as deep as the deepest tree of this step reads
        needed = min(max((d for _, d in with_heads), default=0),
                     max(len(c) for c in self.policy.choices))
        if self.module_ctx is not None:
            head_cands = self._draft_in_context(hidden, with_heads, committed, needed)
        elif self.heads is not None and with_heads:
            hs = [s for s, _ in with_heads]
            idx = torch.tensor([rows[seqs.index(s)] for s in hs], device=hidden.device)
            cands = self.heads.candidates(
                hidden[idx], self.model, [s.token_ids[-1] for s in hs], needed,
                positions=[s.num_cached - 1 for s in hs])  # last accepted token's
            head_cands = {id(s): c for s, c in zip(hs, cands)}
        for seq, depth in zip(spec_seqs, depths):
            seq.draft = self.policy.build_tree(seq.token_ids, head_cands.get(id(seq)), depth)

    def _draft_in_context(self, hidden: torch.Tensor, with_heads: list[tuple[Sequence, int]],
                          committed: dict[int, NewEntries], needed: int
                          ) -> dict[int, list[list[int]]]:
        """Context-attending modules: write the module entries of every prefill chunk and of
        every drafting sequence's accepted path, and draft for the latter, in one call.
        Sequences that draft nothing this step skip their entries (see mtp_context.py)."""
        for s, _ in with_heads:
            committed[id(s)].drafts = True
        entries = [e for e in committed.values() if e.drafts or e.prefill]
        if not entries:
            return {}
        cands = write_and_draft(self.heads, hidden, self.model, entries, self.module_ctx, needed)
        by_entry = {id(e): c for e, c in zip([e for e in entries if e.drafts], cands)}
        return {id(s): by_entry[id(committed[id(s)])] for s, _ in with_heads}

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

    def _output(self, seq: Sequence, tokens: list[int], text: str, reason: str | None,
                stop_reason: str | int | None = None, error: str | None = None) -> RequestOutput:
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=tokens,
            new_text=text,
            num_prompt_tokens=seq.prompt_len,
            num_output_tokens=seq.num_emitted,
            finished=reason is not None,
            finish_reason=reason,
            stop_reason=stop_reason,
            spec=seq.spec,
            error=error,
        )

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
