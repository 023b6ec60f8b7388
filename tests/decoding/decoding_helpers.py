"""Helpers shared by the tests in tests/decoding (imported by module name, like server_helpers).

- `prefill_hidden`: run sequences through a `CausalLM` in ONE packed step on a fresh
  KVCache, with metadata laid out as `LLMEngine._prepare` does (the oracle for "what the
  engine's cache and logits should be").
- `hf_default_model`: the default GGUF loaded by transformers, once per process.
- `run_requests`: drive `engine.step()` by hand and keep every RequestOutput.
- `random_causal_lm` / `tiny_config`: small random-weight models for exact (float64) checks.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from dataclasses import dataclass, field

import torch

from mtpserve.decoding.model.attention_metadata import AttentionMetadata
from mtpserve.decoding.config import ModelConfig, SamplingParams
from mtpserve.decoding.model.kv_cache import KVCache
from mtpserve.decoding.model.trunk import CausalLM


def _long(xs) -> torch.Tensor:
    return torch.tensor(list(xs), dtype=torch.long)


@torch.inference_mode()
def prefill_hidden(model: CausalLM, seqs: list[list[int]], slots: list[int] | None = None,
                   ) -> tuple[list[torch.Tensor], KVCache]:
    """Prefill every sequence from position 0 in one packed forward.

    seqs: B token lists (different lengths allowed); slots: the cache slot of each (default
    0..B-1; a permutation exercises the non-contiguous gather path). Returns the final-normed
    hidden states [n_i, H] of each sequence and the cache it wrote.
    """
    p = next(model.parameters())
    B = len(seqs)
    slots = list(range(B)) if slots is None else list(slots)
    q_len = max(len(s) for s in seqs)
    kv = KVCache(model.config, max(slots) + 1, q_len + 4, p.dtype, p.device)
    ids: list[int] = []
    positions: list[int] = []
    tslots: list[int] = []
    tstore: list[int] = []
    q_gather: list[int] = []
    q_scatter: list[int] = []
    mask = torch.zeros(B, 1, q_len, q_len, dtype=torch.bool)
    for b, s in enumerate(seqs):
        n, base = len(s), len(ids)
        ids += s
        positions += range(n)
        tslots += [slots[b]] * n
        tstore += range(n)
        mask[b, 0, :n, :n] = torch.ones(n, n, dtype=torch.bool).tril_()
        mask[b, 0, n:, 0] = True
        q_gather += list(range(base, base + n)) + [-1] * (q_len - n)
        q_scatter += range(b * q_len, b * q_len + n)
    T = len(ids)
    contiguous = slots == list(range(slots[0], slots[0] + B))
    meta = AttentionMetadata(
        positions=_long(positions).to(p.device),
        token_slots=_long(tslots).to(p.device),
        token_store=_long(tstore).to(p.device),
        seq_slots=_long(slots).to(p.device),
        slot_start=slots[0] if contiguous else None,
        kv_len=q_len,
        num_seqs=B,
        q_len=q_len,
        q_gather=None if B == 1 else _long(T if g < 0 else g for g in q_gather).to(p.device),
        q_scatter=None if B == 1 else _long(q_scatter).to(p.device),
        mask=mask.to(p.device),
    )
    hidden = model(_long(ids).to(p.device), meta, kv)
    out, off = [], 0
    for s in seqs:
        out.append(hidden[off:off + len(s)])
        off += len(s)
    return out, kv


def prefill_logits(model: CausalLM, ids: list[int]) -> torch.Tensor:
    """[len(ids), V] float32 logits of one sequence prefilled alone (the engine's own head)."""
    (h,), _ = prefill_hidden(model, [ids])
    with torch.inference_mode():
        return model.compute_logits(h)


def logits64(model: CausalLM, hidden: torch.Tensor) -> torch.Tensor:
    """Unembedding in the model's own dtype (compute_logits always returns float32)."""
    with torch.inference_mode():
        return torch.nn.functional.linear(hidden, model.unembed_weight())


@functools.lru_cache(maxsize=1)
def hf_default_model():
    """transformers' model of the embedded default GGUF, fp32, loaded once per process."""
    from transformers import AutoModelForCausalLM

    from mtpserve.decoding.model.checkpoint import default_model_path

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path),
                                                 gguf_file=os.path.basename(path),
                                                 dtype=torch.float32)
    return model.eval()


def chat(tokenizer, text: str) -> list[int]:
    return tokenizer.encode_chat([{"role": "user", "content": text}])


@dataclass
class Run:
    """Everything one request received, delta by delta."""

    outputs: list = field(default_factory=list)

    @property
    def token_ids(self) -> list[int]:
        return [t for o in self.outputs for t in o.new_token_ids]

    @property
    def text(self) -> str:
        return "".join(o.new_text for o in self.outputs)

    @property
    def last(self):
        return self.outputs[-1]

    @property
    def deltas(self) -> list[list[int]]:
        return [list(o.new_token_ids) for o in self.outputs]


def run_requests(engine, requests: list[tuple[list[int], SamplingParams]], max_steps: int = 2000
                 ) -> list[Run]:
    """Add the requests, step the engine until all finish, return one Run per request.

    Leaves the shared engine clean: anything unfinished (a failing assertion elsewhere) is
    aborted before returning or raising.
    """
    base = f"t{id(requests)}-{len(engine._seqs)}-{engine.num_steps}-"
    rids = [base + str(i) for i in range(len(requests))]
    runs = {rid: Run() for rid in rids}
    try:
        for rid, (ids, params) in zip(rids, requests):
            engine.add_request(rid, ids, params)
        for _ in range(max_steps):
            if not any(r in engine._seqs for r in rids):
                break
            for out in engine.step():
                if out.request_id in runs:
                    runs[out.request_id].outputs.append(out)
        else:
            raise AssertionError(f"requests not finished after {max_steps} steps")
    finally:
        for rid in rids:
            engine.abort_request(rid)
    return [runs[r] for r in rids]


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


# A raw (non-chat) prompt the default model continues by repeating it: n-gram drafts get
# accepted several at a time. Shared by test_greedy_invariants and test_stops.
REPETITIVE = ("The cat sat on the mat. The dog sat on the log. "
              "The cat sat on the mat. The dog sat on the log.")
REP_MAX = 16
_RUN_CACHE: dict = {}


def cached_run(engine, prompt_ids: list[int], params: SamplingParams) -> Run:
    """One request run alone, memoised per process: reference runs cost real decode steps
    on a 2-core machine, so the test modules share them (deterministic: greedy or seeded)."""
    key = (id(engine), tuple(prompt_ids), repr(params))
    if key not in _RUN_CACHE:
        _RUN_CACHE[key] = run_requests(engine, [(prompt_ids, params)])[0]
    return _RUN_CACHE[key]


# -- tiny random-weight models ------------------------------------------------------------
def tiny_config(vocab: int = 256, hidden: int = 64, layers: int = 2, heads: int = 4,
                kv_heads: int = 2, **kw) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
                       max_position_embeddings=kw.pop("max_position_embeddings", 512), **kw)


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int, std: float = 0.5) -> torch.nn.Module:
    """Every parameter random (norm weights around 1), reproducibly."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(module.named_parameters()):
        if p.numel() == 0:
            continue
        noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
        if name.endswith("norm.weight") or "layernorm" in name:
            p.copy_(1.0 + 0.2 * noise)
        else:
            fan_in = p.shape[-1] if p.dim() > 1 else 1
            p.copy_(noise * (std if p.dim() == 1 or "embed" in name else 1.0 / fan_in ** 0.5))
    return module


def random_causal_lm(cfg: ModelConfig, dtype: torch.dtype = torch.float64, seed: int = 0,
                     extra_positions: int = 256) -> CausalLM:
    model = CausalLM(cfg, max_positions=cfg.max_position_embeddings + extra_positions)
    randomize_(model, seed)
    model.to(dtype)
    model.rope.to(torch.float32)
    return model.eval()


def tiny_engine(tokenizer, heads=None, proposer: str = "ngram", dtype: torch.dtype = torch.float64,
                seed: int = 0, max_num_seqs: int = 4, max_model_len: int = 256, hidden: int = 32,
                tree: str = "auto", **engine_kw):
    """An LLMEngine over a random-weight model whose vocab is the tokenizer's (so text works)."""
    from mtpserve.decoding.config import EngineConfig, SpecConfig
    from mtpserve.decoding.engine.llm_engine import LLMEngine

    cfg = tiny_config(vocab=tokenizer.vocab_size, hidden=hidden, layers=2, heads=4, kv_heads=2,
                      tie_word_embeddings=False)
    model = random_causal_lm(cfg, dtype, seed=seed)
    if isinstance(heads, torch.nn.Module):
        heads = heads.to(dtype).eval()
    config = EngineConfig(dtype=str(dtype).removeprefix("torch."), device="cpu",
                          max_num_seqs=max_num_seqs, max_model_len=max_model_len, seed=seed,
                          spec=SpecConfig(mode="on", proposer=proposer, tree=tree), **engine_kw)
    return LLMEngine(config, model, tokenizer, "tiny", heads=heads)


def tiny_int4_engine(tokenizer, int4_kernel: str = "auto", seed: int = 3,
                     batch_invariant: bool = True, **engine_kw):
    """An LLMEngine over a random model (hidden 64: whole int4 blocks) quantized to int4 as
    from_config does, fp32, n-gram speculation on; batch-invariant unless told otherwise."""
    from mtpserve.decoding.config import EngineConfig, SpecConfig
    from mtpserve.decoding.engine.llm_engine import LLMEngine

    cfg = tiny_config(vocab=tokenizer.vocab_size, hidden=64, layers=2, heads=4, kv_heads=2,
                      tie_word_embeddings=False)
    model = random_causal_lm(cfg, torch.float32, seed=seed)
    model.quantize("int4", int4_kernel=int4_kernel)
    model.use_transposed_weights()
    if batch_invariant:
        assert model.set_batch_invariant(True) == []
    config = EngineConfig(dtype="float32", device="cpu", max_num_seqs=2, max_model_len=256,
                          batch_invariant=batch_invariant,
                          spec=SpecConfig(mode="on", proposer="ngram"), **engine_kw)
    return LLMEngine(config, model, tokenizer, "tiny-int4")


# A prompt the n-gram proposer drafts from, so speculative steps verify several rows.
REPEATING = "one two three one two three one two three one two three"


def plain_and_speculative(engine, prompt: list[int], tokens: int = 64) -> tuple[list[int], Run]:
    """`tokens` greedy tokens of `prompt` without speculation, and the speculative run."""
    def params(speculate: bool) -> SamplingParams:
        return SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True,
                              speculate=speculate)

    plain = run_requests(engine, [(prompt, params(False))])[0].token_ids
    return plain, run_requests(engine, [(prompt, params(True))])[0]


def fresh_process(code: str, **env: str) -> subprocess.CompletedProcess:
    """`code` run by this Python in a new process at the repository root with `env` added:
    for kernel paths that are chosen once per process (forced by environment variables)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return subprocess.run([sys.executable, "-c", code], cwd=root, env=dict(os.environ, **env),
                          capture_output=True, text=True, timeout=300, check=False)


def interrupt_after(steps: int, run) -> None:
    """Call `run` (a training run) and kill it with an exception right after step `steps`
    was checkpointed, as an interrupted process would stop (for resume tests)."""
    import pytest

    from mtpserve.decoding.training.progress import ProgressBar

    class Stop(Exception):
        pass

    orig = ProgressBar.update

    def update(self, step, text):
        if step > steps:
            raise Stop
        orig(self, step, text)

    ProgressBar.update = update
    try:
        with pytest.raises(Stop):
            run()
    finally:
        ProgressBar.update = orig


def interrupt_engine_after(engine, steps: int) -> None:
    """Make `engine.step` raise KeyboardInterrupt after `steps` calls: a run cut short."""
    real, calls = engine.step, []

    def step():
        calls.append(1)
        if len(calls) > steps:
            raise KeyboardInterrupt
        return real()

    engine.step = step
