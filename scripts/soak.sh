#!/usr/bin/env bash
# Soak test: mtpserve-loadtest at saturation for N minutes (default 10), every answer
# checked against the greedy answer of its prompt alone; RSS / fds / latency per minute.
#
#   bash scripts/soak.sh                  # starts its own fp32 server, 10 minutes
#   bash scripts/soak.sh --minutes 2      # shorter
#   bash scripts/soak.sh --base-url http://127.0.0.1:8000 --pid SERVER_PID
#
# Every option: .venv/bin/python scripts/soak.py --help. Results in soak-results/
# (report.md, report.json, the load tester's results). Exit status 1 when a check fails.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec .venv/bin/python scripts/soak.py "$@"
