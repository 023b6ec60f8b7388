#!/usr/bin/env bash
# Run a command as it would run on an AVX2-only x86 CPU (AVX2+FMA+F16C, no AVX-512), on a
# machine that has AVX-512: the checks docs/benchmarks.md's "AVX2-only CPUs" rows name.
#   sudo bash scripts/as_avx2_cpu.sh .venv/bin/python -m pytest -q tests/decoding/test_int4_vnni.py
# (COMMAND must be an executable file qemu can load, e.g. the venv's python, not a script.)
# Two things make the CPU look AVX2-only, and both are needed:
# - qemu-user's Haswell model (Debian's qemu-user; QEMU >= 7.2 emulates AVX2, FMA and F16C
#   and no AVX-512 at all): cpuid says AVX2, so __builtin_cpu_supports in our kernels and
#   PyTorch's own dispatch pick their AVX2 paths, and any AVX-512 instruction that still
#   runs is an illegal instruction, not a silent pass;
# - a /proc/cpuinfo without the AVX-512 and AMX flags, bind-mounted in a private mount
#   namespace (root: unshare -m): qemu-user shows the host's file, and mtpserve's
#   cpu_flags() and inductor's vector-ISA choice read it.
# Limits: timings mean nothing (emulated, ~20-100x slower); child processes the command
# starts (a compiler, `fresh_process` tests) run natively with the same /proc/cpuinfo.
# Use a cache folder of its own (XDG_CACHE_HOME, TORCHINDUCTOR_CACHE_DIR) so nothing built
# for the real CPU is read back.
set -euo pipefail
command -v qemu-x86_64 >/dev/null || { echo "needs qemu-user (apt-get install qemu-user)" >&2; exit 2; }
[[ $# -gt 0 ]] || { echo "usage: $0 COMMAND [ARGS...]" >&2; exit 2; }
fake=$(mktemp /tmp/cpuinfo-avx2.XXXXXX)
trap 'rm -f "$fake"' EXIT
sed -E '/^flags/ s/ (avx512[a-z_0-9]*|amx[a-z_0-9]*|avx_vnni[a-z_0-9]*|avx_ifma|avx_ne_convert)\b//g' \
  /proc/cpuinfo >"$fake"
if grep -q -E 'avx512|amx' "$fake"; then echo "could not strip the AVX-512 flags" >&2; exit 1; fi
unshare -m bash -c 'mount --bind "$0" /proc/cpuinfo && exec qemu-x86_64 -cpu Haswell-v4 "$@"' \
  "$fake" "$@" 2> >(grep -v "TCG doesn't support requested feature" >&2)
