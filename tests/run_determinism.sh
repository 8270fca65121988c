#!/usr/bin/env bash
# The determinism tests once more, under CPU kernels other than the ones this machine picks by default: a
# test that asserts bit equality between computations of different shapes passes or fails with the kernels, so it
# fails here on any machine instead of only on the CPU whose kernels happen to round the two shapes differently.
#
#   pass 1, baseline kernels: MKL's SSE4.2 kernels, PyTorch's non-vectorised ATen kernels, OpenBLAS (numpy, FAISS)
#           at its oldest core type and FAISS without SIMD;
#   pass 2, MKL's Intel kernels: on a CPU that is not Intel, MKL runs generic kernels whatever MKL_ENABLE_INSTRUCTIONS
#           says; tests/mkl_intel_paths.c (compiled here, preloaded) lets it take the kernels it takes on an Intel CPU
#           with the same instruction sets (AVX-512 on this machine: the kernels that round a [4, d] x [d, 8] and an
#           [8, d] x [d, 8] sgemm differently).  On an Intel CPU, MKL's AVX2 kernels instead.  Skipped, and said
#           so, without a C compiler or where the shim changes nothing.
#
# usage: tests/run_determinism.sh PYTHON [pytest arguments, e.g. -m "determinism and not dist"]
set -uo pipefail
PY=${1:?usage: tests/run_determinism.sh PYTHON [pytest arguments]}
shift
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || set -- -m determinism

mkl_path() {  # which kernels MKL runs under the environment VAR=value ... (its verbose banner, shortened)
    env "$@" MKL_VERBOSE=1 "$PY" -c "import torch; torch.ones(8, 8) @ torch.ones(8, 8)" 2>/dev/null \
        | sed -n '1s/.*architecture //p' | sed 's/, Lnx.*//' | head -c 160
}

failed=0
run_pass() {  # name, then the environment of the pass as VAR=value words
    local name=$1
    shift
    echo "== determinism tests, $name: $* (MKL: $(mkl_path "$@"))"
    env "$@" "$PY" -m pytest -q -p no:cacheprovider "${ARGS[@]}" || failed=1
}

ARGS=("$@")
run_pass "baseline kernels" MKL_ENABLE_INSTRUCTIONS=SSE4_2 ATEN_CPU_CAPABILITY=default OPENBLAS_CORETYPE=Prescott \
    FAISS_SIMD_LEVEL=NONE

if grep -qm1 GenuineIntel /proc/cpuinfo 2>/dev/null; then
    run_pass "MKL's Intel AVX2 kernels" MKL_ENABLE_INSTRUCTIONS=AVX2
elif ! command -v cc >/dev/null 2>&1; then
    echo "== determinism tests, MKL's Intel kernels: skipped (not an Intel CPU and no C compiler for the shim)"
else
    shim_dir=$(mktemp -d)
    trap 'rm -rf "$shim_dir"' EXIT
    cc -shared -fPIC -O2 -o "$shim_dir/libmkl_intel_paths.so" tests/mkl_intel_paths.c
    generic=$(mkl_path)
    intel=$(mkl_path LD_PRELOAD="$shim_dir/libmkl_intel_paths.so")
    if [ "$intel" = "$generic" ]; then
        echo "== determinism tests, MKL's Intel kernels: skipped (the shim does not change MKL's kernels: $generic)"
    else
        run_pass "MKL's Intel kernels on this non-Intel CPU" LD_PRELOAD="$shim_dir/libmkl_intel_paths.so"
    fi
fi
exit $failed
