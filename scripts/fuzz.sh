#!/usr/bin/env bash
# Schema fuzzing of a real `mtpserve serve` process from its own /openapi.json
# (schemathesis, every operation, valid and invalid cases, coverage phase included;
# one worker: its coverage phase is not thread-safe in 4.32).
#
#   bash scripts/fuzz.sh                    # 200 fuzzed cases per operation and mode, seed 1
#   bash scripts/fuzz.sh --max-examples 1000 --seed 7
#
# Extra arguments go to `schemathesis run`. The server caps max_tokens at 4
# (--max-tokens-limit, advertised in the document) so valid cases stay short and larger
# values must be refused at once. Pass conditions: every built-in check but
# positive_data_acceptance (rules across fields, e.g. best_of == n, are not in the
# document), no response slower than 30 s, and afterwards /health is ok and the engine
# idle (nothing running or waiting, KV cache empty). Output in fuzz-results/.
# CI runs a shorter in-process version: tests/server/test_fuzz_schema.py.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
out="${FUZZ_OUT:-fuzz-results}"
mkdir -p "$out"
py=.venv/bin/python
port="$($py -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
url="http://127.0.0.1:$port"

$py -m mtpserve.server.cli serve --port "$port" --dtype float32 --max-model-len 1024 \
    --max-num-seqs 4 --max-queued 8 --max-tokens-limit 4 >"$out/server.log" 2>&1 &
server=$!
trap 'kill -TERM "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true' EXIT
for _ in $(seq 600); do
    if curl -sf "$url/health" >/dev/null 2>&1; then break; fi
    kill -0 "$server" 2>/dev/null || { echo "server exited; see $out/server.log" >&2; exit 1; }
    sleep 0.5
done
curl -sf "$url/health" >/dev/null || { echo "server not healthy" >&2; exit 1; }

rc=0
.venv/bin/schemathesis run "$url/openapi.json" --seed 1 --max-examples 200 --workers 1 \
    --checks all --exclude-checks positive_data_acceptance --max-response-time 30 \
    --request-timeout 60 --continue-on-failure --suppress-health-check all \
    --generation-database none \
    --report junit --report-dir "$out" "$@" 2>&1 | tee "$out/schemathesis.log" || rc=$?

# healthy and idle afterwards
$py - "$url" <<'PY' || rc=1
import sys, time, httpx
from prometheus_client.parser import text_string_to_metric_families
url = sys.argv[1]
assert httpx.get(url + "/health").json() == {"status": "ok"}, "unhealthy after fuzzing"
for _ in range(300):
    m = {s.name: s.value for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)
         for s in f.samples if not s.labels}
    if m["mtpserve_num_requests_running"] == m["mtpserve_num_requests_waiting"] == 0:
        break
    time.sleep(0.1)
assert m["mtpserve_num_requests_running"] == m["mtpserve_num_requests_waiting"] == 0, m
assert m["mtpserve_kv_cache_usage_ratio"] == 0, m
r = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "temperature": 0},
               timeout=60)
assert r.status_code == 200, r.text
print("after fuzzing: healthy, engine idle, KV cache empty, still answering")
PY
exit "$rc"
