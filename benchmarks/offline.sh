#!/usr/bin/env bash
# The offline numbers of docs/benchmarks.md, in one go, on a QUIET machine (nothing else
# running: every ratio is measured within one process, but absolute tok/s and the bandwidth
# fraction are only meaningful without neighbours). Each run prints its tables and writes
# JSON next to a copy of its log under $OUT (default benchmarks/results/<host>-<date>).
#
#   bash benchmarks/offline.sh            # default model, default dtype (bf16 on CPU)
#   QUICK=1 bash benchmarks/offline.sh    # 2 prompts x 16 tokens: checks the script only
#   ENGINE_FLAGS="--heads PATH" bash benchmarks/offline.sh   # extra engine flags for every run
set -euo pipefail
OUT=${OUT:-benchmarks/results/$(hostname)-$(date +%Y%m%d-%H%M)}
mkdir -p "$OUT"
if [[ -n "${QUICK:-}" ]]; then
  COMMON=(--num-prompts 2 --max-tokens 16 --warmup 0)
  BS=1,2; RUNS=3
else
  COMMON=(--num-prompts 16 --max-tokens 128 --warmup 1)
  BS=1,4,16; RUNS=30
fi
run() {  # name, then bench flags
  local name=$1; shift
  echo "== $name: mtpserve bench $*" | tee "$OUT/$name.txt"
  # shellcheck disable=SC2086  # ENGINE_FLAGS is split on purpose
  mtpserve bench "${COMMON[@]}" ${ENGINE_FLAGS:-} "$@" --out "$OUT/$name.json" 2>&1 | tee -a "$OUT/$name.txt"
}
# 1. plain decoding vs transformers (same dtype, dense weights), bandwidth limit, RSS
run plain --batch-sizes "$BS"
# 2. the same engine in float32 and with int8 weights (is bf16 the right CPU default?)
run plain-fp32 --batch-sizes 1 --dtype float32 --no-transformers
run plain-int8 --batch-sizes 1 --weights int8 --no-transformers
# 3. what verifying k tokens costs at context 300
run verify-curve --verify-curve --verify-runs "$RUNS"
# 4. speculation off vs on, greedy / typical 0.7 / rejection 0.7, batch 1 and under batch
run compare --compare --compare-batch-sizes "$BS"
# 5. where a decode step's time goes
run profile --profile --profile-rows 25
echo "results in $OUT"
