#!/usr/bin/env bash
# The one script for the GPU machine (BRIEF §9): unpacks the Debian packages CI uses into a prefix,
# builds lmd with the CUDA backend for Hopper, runs the [gpu] tests and the op-level decode benchmark,
# then `lmd bench generation` on random-weight Llama-2-7B (fp16) and InternLM2-1.8B (bf16) checkpoints
# made here, each beside Hugging Face transformers on the same GPU (scripts/bench_transformers.py).
#   scripts/gpu_check.sh [DEBS_DIR]     (default: .debs beside this checkout)
#   LMD_GPU_CHECK_MODELS="llama2-7b internlm2-1.8b" (default; empty: no end-to-end benchmarks)
# Test models and tokenizers are read from $LMD_TEST_ASSETS, else ./assets when present, else ../shared.
# Logs go to $OUT when set (the device tool's output folder), else /tmp/lmd-gpu-out.
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

timeout 240 "$BUILD/tests/lmd_tests" "[gpu]" --durations yes >"$LOGS/gpu_tests.log" 2>&1
tests_rc=$?
grep -E -A3 "warning:|FAILED|failed|passed|with expansion" "$LOGS/gpu_tests.log" | grep -v "^--$" | tail -60
echo "gpu tests exit code: $tests_rc"

timeout 90 "$BUILD/cuda/lmd_cuda_bench" >"$LOGS/bench.log" 2>&1
bench_rc=$?
cat "$LOGS/bench.log"
echo "bench exit code: $bench_rc"
# Device-to-device copy rate (read + write) for the "% peak" column of lmd bench generation.
PEAK=$(grep -m1 "device-to-device copy" "$LOGS/bench.log" | grep -oE "[0-9]+ GB/s" | grep -oE "[0-9]+")

ASSETS=${LMD_TEST_ASSETS:-$ROOT/../shared}
LMD=$BUILD/apps/lmd
[[ -x $LMD ]] || LMD=$(find "$BUILD" -name lmd -type f -perm -u+x | head -1)
e2e_rc=0
for shape in ${LMD_GPU_CHECK_MODELS-llama2-7b internlm2-1.8b}; do
  dir=/tmp/lmd-models/$shape
  dtype=$([[ $shape == internlm2* ]] && echo bfloat16 || echo float16)
  rm -rf "$dir"
  timeout 150 "$LMD" bench make-model "$shape" --dst "$dir" --tokenizers "$ASSETS/tokenizers" \
    >"$LOGS/make-$shape.log" 2>&1 || { tail -5 "$LOGS/make-$shape.log"; e2e_rc=1; continue; }
  timeout 120 "$LMD" bench generation "$dir" -c 1 64 --prompt-tokens 128 --completion-tokens 128 -w 1 --rounds 2 \
    ${PEAK:+--peak-bandwidth $PEAK} --json "$LOGS/gen-$shape.json" >"$LOGS/gen-$shape.log" 2>&1 || e2e_rc=1
  timeout 60 "$LMD" bench generation "$dir" -c 1 --prompt-tokens 2048 --completion-tokens 8 -w 1 --rounds 2 \
    >"$LOGS/prefill-$shape.log" 2>&1 || e2e_rc=1
  PYTHONUNBUFFERED=1 timeout 150 python3 "$ROOT/scripts/bench_transformers.py" "$dir" --dtype "$dtype" \
    >"$LOGS/hf-$shape.log" 2>&1 || e2e_rc=1
  rm -rf "$dir"
done

echo "== summary ($(date -u +%F), copy bandwidth ${PEAK:-?} GB/s) =="
for shape in ${LMD_GPU_CHECK_MODELS-llama2-7b internlm2-1.8b}; do
  echo "-- $shape: lmd bench generation (decode, then 2048-token prefill; first token ms = prefill)"
  grep -E "^ *(batch| +[0-9]+ +[0-9]+ +[0-9]+ )" "$LOGS/gen-$shape.log" "$LOGS/prefill-$shape.log" 2>/dev/null |
    sed "s|$LOGS/||" || true
  grep -iE "error|lmd:" "$LOGS/gen-$shape.log" | tail -3
  echo "-- $shape: transformers"
  tail -2 "$LOGS/hf-$shape.log"
done
exit $((tests_rc != 0 || bench_rc != 0 || e2e_rc != 0))
