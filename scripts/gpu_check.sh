#!/usr/bin/env bash
# The one script for the GPU machine (BRIEF §9): unpacks the Debian packages CI uses into a prefix,
# builds lmd with the CUDA backend for Hopper, runs the [gpu] tests and the benchmarks.
#   scripts/gpu_check.sh [DEBS_DIR]     (default: .debs beside this checkout)
# LMD_GPU_TESTS: the Catch2 test filter (default "[gpu]"; e.g. "[w4a16]"); LMD_GPU_BENCH: which
# benchmarks, of decode (fp16 batch-1 decode step), decode-w4a16 (the same with int4 linears), w4a16 (the
# int4 linears alone); default all three.
# Test models are read from $LMD_TEST_ASSETS, else ./assets when present, else ../shared. Logs go to
# $OUT when set (the device tool's output folder), else /tmp/lmd-gpu-out.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEBS=${1:-$ROOT/.debs}
PREFIX=/tmp/lmd-deps
BUILD=/tmp/lmd-build
LOGS=${OUT:-/tmp/lmd-gpu-out}
mkdir -p "$PREFIX" "$LOGS"
if [[ -z "${LMD_TEST_ASSETS:-}" && -d "$ROOT/assets/models" ]]; then export LMD_TEST_ASSETS=$ROOT/assets; fi

for f in "$DEBS"/*.deb; do dpkg -x "$f" "$PREFIX" || exit 1; done
# The packages' .pc files say prefix=/usr; point them at the unpacked copy (headers and library agree).
sed -i "s|^prefix=/usr\$|prefix=$PREFIX/usr|" "$PREFIX"/usr/lib/x86_64-linux-gnu/pkgconfig/*.pc
export LD_LIBRARY_PATH=$PREFIX/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader
nvcc --version | tail -1

if ! cmake -S "$ROOT" -B "$BUILD" -DCMAKE_PREFIX_PATH="$PREFIX/usr" \
    -DCMAKE_CUDA_ARCHITECTURES=90a -DCMAKE_BUILD_TYPE=Release >"$LOGS/configure.log" 2>&1; then
  tail -40 "$LOGS/configure.log"
  exit 1
fi
if ! cmake --build "$BUILD" -j16 >"$LOGS/build.log" 2>&1; then
  grep -E -B2 -A6 "error" "$LOGS/build.log" | head -80
  exit 1
fi
echo "build: ok"

timeout 420 "$BUILD/tests/lmd_tests" "${LMD_GPU_TESTS:-[gpu]}" --durations yes >"$LOGS/gpu_tests.log" 2>&1
tests_rc=$?
grep -E -A3 "warning:|FAILED|failed|passed|with expansion" "$LOGS/gpu_tests.log" | grep -v "^--$" | tail -60
echo "gpu tests exit code: $tests_rc"

bench_rc=0
for bench in ${LMD_GPU_BENCH:-decode decode-w4a16 w4a16}; do
  case $bench in
    decode) cmd=("$BUILD/cuda/lmd_cuda_bench") ;;
    decode-w4a16) cmd=("$BUILD/cuda/lmd_cuda_bench" --w4a16) ;;
    w4a16) cmd=("$BUILD/cuda/lmd_bench_w4a16") ;;
    *) echo "unknown benchmark $bench"; exit 1 ;;
  esac
  timeout 240 "${cmd[@]}" >"$LOGS/bench-$bench.log" 2>&1
  rc=$?
  echo "== $bench (exit code $rc)"
  cat "$LOGS/bench-$bench.log"
  bench_rc=$((bench_rc | rc))
done
exit $((tests_rc != 0 || bench_rc != 0))
