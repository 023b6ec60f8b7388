"""The plain section (the default): plain-decoding tokens/s and ms per decode step of the
engine at each batch size, next to transformers on the same token ids, with peak RSS and
the fraction of the weight-streaming limit (bandwidth / model bytes) batch-1 decode reaches.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import TYPE_CHECKING

import torch

from ...config import SamplingParams
from .llama_cpp import run_llama_bench
from .memory import current_rss_mb, measure_bandwidth, model_bytes, peak_rss_mb
from .runs import batches, print_progress, run_engine_batch, throughput_row
from .tables import format_table
from .transformers_baseline import bench_transformers, load_transformers_model

if TYPE_CHECKING:
    from ...engine.llm_engine import LLMEngine


def greedy_params(args: argparse.Namespace, n: int, **kw) -> list[SamplingParams]:
    """n greedy requests of --max-tokens, fixed length unless --eos; `kw` overrides."""
    base = dict(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=not args.eos)
    base.update(kw)
    return [SamplingParams(**base) for _ in range(n)]


def plain_throughput(engine: LLMEngine, args: argparse.Namespace, prompt_ids: list[list[int]],
                     b: int) -> dict:
    """Every prompt decoded greedily, speculation off, in batches of b: throughput_row."""
    return throughput_row([run_engine_batch(engine, g, greedy_params(args, b, speculate=False))
                           for g in batches(prompt_ids, b)])


def bench_engine_plain(engine: LLMEngine, args: argparse.Namespace, prompt_ids: list[list[int]],
                       batch_sizes: list[int]) -> list[dict]:
    rows = []
    for b in batch_sizes:
        for _ in range(args.warmup):
            warm = greedy_params(args, b, max_tokens=min(16, args.max_tokens), speculate=False)
            run_engine_batch(engine, batches(prompt_ids, b)[0], warm)
        rows.append({"impl": "mtpserve", "batch": b,
                     **plain_throughput(engine, args, prompt_ids, b)})
        print_progress(rows[-1])
    return rows


def section_plain(engine: LLMEngine, args: argparse.Namespace, prompt_ids: list[list[int]],
                  batch_sizes: list[int], hf_sizes: list[int]) -> dict:
    print("plain decoding (greedy, speculation off)", file=sys.stderr, flush=True)
    rows = bench_engine_plain(engine, args, prompt_ids, batch_sizes)
    out: dict = {"rows": rows, "peak_rss_mb_engine": peak_rss_mb(),
                 "rss_mb_engine_now": current_rss_mb()}
    if engine.device.type == "cuda":
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(engine.device) / 2**20
    if args.no_transformers:
        out["transformers"] = "skipped (--no-transformers)"
    else:
        from ...model.checkpoint import default_model_path

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
    if getattr(args, "llama_bench", None):
        out.update(llama_cpp_row(engine, args, rows, prompt_ids))
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


def llama_cpp_row(engine: LLMEngine, args: argparse.Namespace, rows: list[dict],
                  prompt_ids: list[list[int]]) -> dict:
    """llama.cpp's plain decode on the same file, same threads, now; its row joins `rows`
    (decode tok/s and ms/step only: llama-bench -p 0 times generation alone)."""
    from ...model.checkpoint import default_model_path

    gguf = args.model or default_model_path()
    if not str(gguf).endswith(".gguf"):
        return {"llama_cpp": f"not a GGUF file: {gguf}"}
    print("llama.cpp: llama-bench on the same file", file=sys.stderr, flush=True)
    got = run_llama_bench(args.llama_bench, str(gguf), args.max_tokens, torch.get_num_threads())
    if isinstance(got, str):
        print(f"llama.cpp skipped: {got}", file=sys.stderr)
        return {"llama_cpp": got}
    rows.append({"impl": "llama.cpp", "batch": 1, "tokens": args.max_tokens,
                 "tokens_per_s": None, "decode_tokens_per_s": got["decode_tokens_per_s"],
                 "ms_per_step": got["ms_per_token"], "prefill_s_mean": None})
    ours = next(r for r in rows if r["impl"] == "mtpserve" and r["batch"] == 1)
    out = {"llama_cpp": got,
           "batch1_decode_vs_llama_cpp": (ours["decode_tokens_per_s"] or 0)
           / got["decode_tokens_per_s"]}
    if getattr(args, "llama_rounds", 1) > 1:
        out["llama_rounds"] = alternate_with_llama_cpp(engine, args, prompt_ids, str(gguf), ours,
                                                       got)
    return out


def alternate_with_llama_cpp(engine: LLMEngine, args: argparse.Namespace,
                             prompt_ids: list[list[int]], gguf: str, ours: dict, got: dict
                             ) -> dict:
    """--llama-rounds N: our batch-1 decode and llama-bench again, one after the other, N - 1
    more times (the first round is the plain table's): on a VM whose speed drifts between
    minutes one pair is not a ratio. Per round both decode tok/s and their ratio; the
    median ratio and the ratio of the two best."""
    pairs = [(ours["decode_tokens_per_s"] or 0.0, got["decode_tokens_per_s"])]
    for i in range(1, args.llama_rounds):
        print(f"llama.cpp: round {i + 1}/{args.llama_rounds}", file=sys.stderr, flush=True)
        ours_now = plain_throughput(engine, args, prompt_ids, 1)
        again = run_llama_bench(args.llama_bench, gguf, args.max_tokens, torch.get_num_threads())
        if isinstance(again, str):
            print(f"llama.cpp: round {i + 1} skipped: {again}", file=sys.stderr)
            continue
        pairs.append((ours_now["decode_tokens_per_s"] or 0.0, again["decode_tokens_per_s"]))
    ratios = sorted(m / ll for m, ll in pairs)
    return {"rounds": [{"mtpserve_decode_tokens_per_s": m, "llama_cpp_decode_tokens_per_s": ll,
                        "ratio": m / ll} for m, ll in pairs],
            "median_ratio": statistics.median(ratios),
            "best_vs_best": max(m for m, _ in pairs) / max(ll for _, ll in pairs)}


def plain_tables(out: dict) -> str:
    rows = [[r["impl"], r["batch"], r["tokens"], r["tokens_per_s"], r["decode_tokens_per_s"],
             r["ms_per_step"],
             None if r["prefill_s_mean"] is None else 1000 * r["prefill_s_mean"]]
            for r in out["rows"]]
    text = [format_table(["impl", "batch", "tokens", "tok/s", "decode tok/s", "ms/step",
                          "prefill ms"], rows,
                         "\nplain decoding, greedy (tok/s includes prefill; ms/step: decode phase)")]
    if "batch1_decode_vs_llama_cpp" in out:
        text.append(f"batch-1 decode vs llama.cpp (llama-bench -p 0, same file and threads): "
                    f"{out['batch1_decode_vs_llama_cpp']:.2f}x")
    if "llama_rounds" in out:
        lr = out["llama_rounds"]
        text.append(format_table(
            ["round", "mtpserve decode tok/s", "llama.cpp decode tok/s", "ratio"],
            [[i + 1, r["mtpserve_decode_tokens_per_s"], r["llama_cpp_decode_tokens_per_s"],
              r["ratio"]] for i, r in enumerate(lr["rounds"])],
            "\nbatch-1 decode, mtpserve and llama-bench alternating (--llama-rounds)"))
        text.append(f"median ratio {lr['median_ratio']:.2f}x; best vs best "
                    f"{lr['best_vs_best']:.2f}x")
    elif isinstance(out.get("llama_cpp"), str):
        text.append(f"llama.cpp: {out['llama_cpp']}")
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
