#!/usr/bin/env bash
# The engine on the GPU machine (tool `device`): that machine has PyTorch, transformers,
# tokenizers, safetensors and jinja2 but not this package, and cannot fetch anything.
# Prepare here once (writes .device/, ignored by git; carry it):
#   .venv/bin/python scripts/device_check.py prepare .device/smollm2
# Then on the device, from the repository root:
#   bash scripts/device_check.sh [--device cuda] [--out $OUT]
# Imports mtpserve.decoding from this checkout through a path shim; prints the checks
# (scripts/device_check.py) and the bf16 benchmark table.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
shim="$(mktemp -d)"
mkdir -p "$shim/mtpserve"
ln -s "$PWD/decoding" "$shim/mtpserve/decoding"
export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
exec "$PY" scripts/device_check.py run .device/smollm2 "$@"
