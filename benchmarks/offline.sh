#!/usr/bin/env bash
# The offline numbers of docs/benchmarks.md, in one go, on a QUIET machine (nothing else
# running: every ratio is measured within one process, but absolute tok/s and the bandwidth
# fraction are only meaningful without neighbours). Each run prints its tables and writes
# JSON next to a copy of its log under $OUT (default benchmarks/results/<host>-<date>).
#
#   bash benchmarks/offline.sh            # default model and weights (int4 on CPU), ~30 min
#   QUICK=1 bash benchmarks/offline.sh    # 2 prompts x 16 tokens: checks the script only
#   ENGINE_FLAGS="--heads PATH" bash benchmarks/offline.sh   # extra engine flags for every run
set -euo pipefail
OUT=${OUT:-benchmarks/results/$(hostname)-$(date +%Y%m%d-%H%M)}
mkdir -p "$OUT"
CHAT=benchmarks/prompts/chat16.jsonl  # general chat prompts, none of them trained on
if [[ -n "${QUICK:-}" ]]; then
  N=2; TOK=16; WARM=0; BS=1,2; TBS=1; RUNS=3; NCHAT=2
else
  N=8; TOK=128; WARM=1; BS=1,4,16; TBS=1; RUNS=15; NCHAT=16
fi
COMMON=(--max-tokens "$TOK" --warmup "$WARM")
run() {  # name, then bench flags
  local name=$1; shift
  echo "== $name: mtpserve bench $*" | tee "$OUT/$name.txt"
  # shellcheck disable=SC2086  # ENGINE_FLAGS is split on purpose
  mtpserve bench "${COMMON[@]}" ${ENGINE_FLAGS:-} "$@" --out "$OUT/$name.json" 2>&1 | tee -a "$OUT/$name.txt"
}
# 1. plain decoding vs transformers fp32 on HumanEval: the default weights (int4 from the
#    Q4_1 file) and dense fp32 (the same weights and precision as transformers)
run plain --num-prompts "$N" --batch-sizes "$BS" --transformers-batch-sizes "$TBS"
run plain-dense --num-prompts "$N" --batch-sizes 1 --weights dense --dtype float32
run plain-int8 --num-prompts "$N" --batch-sizes 1 --weights int8 --no-transformers
# 2. what verifying k tokens costs at context 300, per weight format
for w in int4 int8 dense; do
  run "verify-$w" --verify-curve --verify-runs "$RUNS" --weights "$w"
done
# 3. speculation off vs on: HumanEval (greedy / typical 0.7 / rejection 0.7, batch 1 and
#    under batch), each draft source alone (greedy), and general chat prompts
run compare --compare --num-prompts "$N" --compare-batch-sizes 1,4
for p in ngram heads; do
  run "compare-$p" --compare --num-prompts "$N" --compare-settings greedy --compare-batch-sizes 1 --proposer "$p"
done
run compare-chat --compare --prompts "$CHAT" --num-prompts "$NCHAT" --compare-settings greedy,typical --compare-batch-sizes 1
# 4. where a decode step's time goes
run profile --profile --profile-rows 25 --num-prompts 2
# 5. numerics: where greedy outputs of the formats and of speculation on/off diverge
echo "== divergence" | tee "$OUT/divergence.txt"
python benchmarks/divergence.py --formats dense:float32,int4,int8 --num-prompts "$N" \
  --max-tokens "$TOK" --out "$OUT/divergence.json" 2>&1 | tee -a "$OUT/divergence.txt"
echo "results in $OUT"
