#!/usr/bin/env bash
# Seconds from launching `mtpserve serve` to its /health answering 200, RUNS times in a row
# (the first run may fill caches; later ones read them), then one chat completion and the
# server's resident memory; prints one line per run and the median of runs 2..RUNS.
#
#   bash benchmarks/start_time.sh                 # RUNS=5 PORT=8031, serve's defaults
#   RUNS=3 bash benchmarks/start_time.sh --compile off
set -euo pipefail
RUNS=${RUNS:-5}; PORT=${PORT:-8031}
BIN=${MTPSERVE:-$(dirname "${BASH_SOURCE[0]}")/../.venv/bin/mtpserve}
LOG=$(mktemp)
times=()
for run in $(seq 1 "$RUNS"); do
  t0=$(date +%s.%N)
  "$BIN" serve --port "$PORT" "$@" >"$LOG" 2>&1 &
  pid=$!
  until curl -sf "localhost:$PORT/health" >/dev/null 2>&1; do
    sleep 0.2
    kill -0 "$pid" 2>/dev/null || { echo "server exited:"; tail -20 "$LOG"; exit 1; }
  done
  secs=$(echo "$(date +%s.%N) - $t0" | bc)
  curl -sf "localhost:$PORT/v1/chat/completions" -H 'content-type: application/json' \
    -d '{"messages":[{"role":"user","content":"Say hi"}],"max_tokens":8,"temperature":0}' >/dev/null
  rss=$(ps -o rss= -p "$pid")
  compile=$(grep -o "compiled the trunk in [0-9.]* s" "$LOG" || true)
  printf "run %d: healthy after %.1f s, RSS %d MB after a request%s\n" "$run" "$secs" \
    $((rss / 1024)) "${compile:+, $compile}"
  times+=("$secs")
  kill "$pid"; wait "$pid" 2>/dev/null || true
done
if [[ "$RUNS" -gt 1 ]]; then
  printf "%s\n" "${times[@]:1}" | sort -n | awk '{a[NR]=$1} END {printf "median of runs 2..%d: %.1f s\n", NR + 1, (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'
fi
rm -f "$LOG"
