#!/usr/bin/env bash
# The one script for the GPU machine (BRIEF §9): unpacks the Debian packages CI uses into a prefix,
# builds lmd with the CUDA backend for Hopper, runs the [gpu] tests and the benchmarks, and prints a
# summary table last.
#   scripts/gpu_check.sh [DEBS_DIR]     (default: .debs beside this checkout)
# Stages, each chosen by a variable (defaults in brackets):
#   LMD_GPU_TESTS   Catch2 filter of the GPU tests ["[gpu]"]; empty: none
#   LMD_GPU_BENCH   op-level benchmarks among decode (fp16 batch-1 decode step, Llama-2-7B shape),
#                   decode-w4a16 (the same with int4 linears), decode-internlm2 (bf16, InternLM2-1.8B
#                   shape), w4a16 (the int4 linears alone) ["decode decode-w4a16 decode-internlm2 w4a16"]
#   LMD_GPU_CHECK_MODELS  `lmd bench generation` on random-weight checkpoints made here, beside Hugging
#                   Face transformers (scripts/bench_transformers.py) ["llama2-7b internlm2-1.8b"]
#   LMD_GPU_HF      0: leave out the transformers side of LMD_GPU_CHECK_MODELS [1]
#   LMD_GPU_AB_ENV  VAR=VALUE: each model's batch-1 decode once more with that variable set (log
#                   gen-SHAPE-ab.log), e.g. LMD_WIDE_DECODE=1 or LMD_FUSED_OPS=1 [unset]
#   LMD_GPU_KV      1: KV-cache quantization on a random Llama-2-7B: blocks at --cache-max-entry-count
#                   0.8 and batch-64 decode with 2048-token contexts for --quant-policy 0/8/4 [0]
#   LMD_GPU_AWQ     1: `lmd lite auto_awq` of a random InternLM2-1.8B on 128 x 2048 ptb tokens (issue #5:
#                   under 3 minutes), then `lmd bench generation` on its output [0]
#   LMD_GPU_AWQ_SEARCH  1: the same quantization again with --search-scale True [0]
#   LMD_GPU_PROFILE 1: Nsight Compute over one batch-1 decode step (fp16 and W4A16): per-kernel times, and
#                   the memory and warp-state sections of the GEMV kernels [0]
# LMD_FUSED_OPS=1 (or all, or a list of norm, swiglu, rope) in the environment turns on the fused
# decode-step ops (norm and SwiGLU in the GEMVs, RoPE in the attention) for everything the lmd binary runs
# here (the tests and lmd_cuda_bench run each way regardless).
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

tests_rc=0
if [[ -n "${LMD_GPU_TESTS-[gpu]}" ]]; then
  timeout 420 "$BUILD/tests/lmd_tests" "${LMD_GPU_TESTS-[gpu]}" --durations yes >"$LOGS/gpu_tests.log" 2>&1
  tests_rc=$?
  grep -E -A3 "warning:|FAILED|failed|passed|with expansion" "$LOGS/gpu_tests.log" | grep -v "^--$" | tail -60
  echo "gpu tests exit code: $tests_rc"
fi

bench_rc=0
for bench in ${LMD_GPU_BENCH-decode decode-w4a16 decode-internlm2 w4a16}; do
  case $bench in
    decode) cmd=("$BUILD/cuda/lmd_cuda_bench") ;;
    decode-w4a16) cmd=("$BUILD/cuda/lmd_cuda_bench" --w4a16) ;;
    decode-internlm2) cmd=("$BUILD/cuda/lmd_cuda_bench" --shape internlm2-1.8b) ;;
    w4a16) cmd=("$BUILD/cuda/lmd_bench_w4a16") ;;
    *) echo "unknown benchmark $bench"; exit 1 ;;
  esac
  timeout 240 "${cmd[@]}" >"$LOGS/bench-$bench.log" 2>&1
  rc=$?
  echo "== $bench (exit code $rc)"
  cat "$LOGS/bench-$bench.log"
  bench_rc=$((bench_rc | rc))
done
if [[ "${LMD_GPU_PROFILE:-0}" == 1 ]]; then
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  for variant in fp16 w4a16; do
    flag=$([[ $variant == w4a16 ]] && echo --w4a16)
    timeout 300 "$NCU" --clock-control none --profile-from-start off --csv \
      --metrics gpu__time_duration.sum,dram__bytes_read.sum "$BUILD/cuda/lmd_cuda_bench" $flag --profile \
      >"$LOGS/ncu-step-$variant.csv" 2>"$LOGS/ncu-step-$variant.err"
    echo "== one decode step under ncu, $variant (exit code $?)"
    python3 "$ROOT/scripts/ncu_summary.py" "$LOGS/ncu-step-$variant.csv" || tail -5 "$LOGS/ncu-step-$variant.err"
    # The first layer's four linears (qkv, o, gate_up, down) in detail.
    timeout 300 "$NCU" --clock-control none --profile-from-start off -k regex:gemv --launch-count 4 \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
      --section WarpStateStats --section SchedulerStats \
      --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
      "$BUILD/cuda/lmd_cuda_bench" $flag --profile \
      >"$LOGS/ncu-gemv-$variant.log" 2>&1
  done
  cuobjdump --dump-sass "$BUILD/cuda/CMakeFiles/lmd_cuda.dir/src/w4a16.cu.o" >"$LOGS/w4a16.sass" 2>&1
fi

# Device-to-device copy rate (read + write) for the "% peak" column of lmd bench generation.
PEAK=$(grep -h -m1 "device-to-device copy" "$LOGS"/bench-*.log 2>/dev/null | grep -oE "[0-9]+ GB/s" | grep -oE "[0-9]+" | head -1)

ASSETS=${LMD_TEST_ASSETS:-$ROOT/../shared}
LMD=$BUILD/lmd
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
  if [[ -n "${LMD_GPU_AB_ENV:-}" ]]; then
    env "$LMD_GPU_AB_ENV" timeout 120 "$LMD" bench generation "$dir" -c 1 --prompt-tokens 128 --completion-tokens 128 \
      -w 1 --rounds 2 ${PEAK:+--peak-bandwidth $PEAK} >"$LOGS/gen-$shape-ab.log" 2>&1 || e2e_rc=1
  fi
  timeout 60 "$LMD" bench generation "$dir" -c 1 --prompt-tokens 2048 --completion-tokens 8 -w 1 --rounds 2 \
    >"$LOGS/prefill-$shape.log" 2>&1 || e2e_rc=1
  if [[ "${LMD_GPU_HF:-1}" == 1 ]]; then
    PYTHONUNBUFFERED=1 timeout 150 python3 "$ROOT/scripts/bench_transformers.py" "$dir" --dtype "$dtype" \
      >"$LOGS/hf-$shape.log" 2>&1 || e2e_rc=1
  fi
  rm -rf "$dir"
done

kv_rc=0
if [[ "${LMD_GPU_KV:-0}" == 1 ]]; then
  dir=/tmp/lmd-models/llama2-7b-kv
  rm -rf "$dir"
  if timeout 150 "$LMD" bench make-model llama2-7b --dst "$dir" --tokenizers "$ASSETS/tokenizers" \
      >"$LOGS/make-kv.log" 2>&1; then
    for qp in 0 8 4; do
      timeout 150 "$LMD" bench generation "$dir" --quant-policy $qp --cache-max-entry-count 0.8 -c 64 \
        --prompt-tokens 2048 --completion-tokens 64 -w 0 --rounds 1 --json "$LOGS/kv-$qp.json" \
        >"$LOGS/kv-$qp.log" 2>&1 || kv_rc=1
    done
  else
    tail -5 "$LOGS/make-kv.log"
    kv_rc=1
  fi
  rm -rf "$dir"
fi

awq_rc=0
if [[ "${LMD_GPU_AWQ:-0}" == 1 ]]; then
  src=/tmp/lmd-models/internlm2-1.8b-awq-src
  rm -rf "$src"
  if timeout 150 "$LMD" bench make-model internlm2-1.8b --dst "$src" --tokenizers "$ASSETS/tokenizers" \
      >"$LOGS/make-awq.log" 2>&1; then
    searches=False
    [[ "${LMD_GPU_AWQ_SEARCH:-0}" == 1 ]] && searches="False True"
    for search in $searches; do
      out=/tmp/lmd-models/internlm2-1.8b-awq-$search
      rm -rf "$out"
      start=$(date +%s.%N)
      timeout 420 "$LMD" lite auto_awq "$src" --calib-dataset ptb --calib-samples 128 --calib-seqlen 2048 \
        --w-bits 4 --w-group-size 128 --batch-size 1 --search-scale $search --work-dir "$out" \
        --dataset-dir "$ASSETS/datasets" >"$LOGS/awq-$search.log" 2>&1 || awq_rc=1
      echo "auto_awq --search-scale $search: wall $(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}') s" >>"$LOGS/awq-$search.log"
      if [[ $search == False ]]; then
        timeout 120 "$LMD" bench generation "$out" -c 1 --prompt-tokens 128 --completion-tokens 128 \
          >"$LOGS/awq-gen.log" 2>&1 || awq_rc=1
      fi
      rm -rf "$out"
    done
  else
    tail -5 "$LOGS/make-awq.log"
    awq_rc=1
  fi
  rm -rf "$src"
fi

echo "== summary ($(date -u +%F), copy bandwidth ${PEAK:-?} GB/s) =="
for shape in ${LMD_GPU_CHECK_MODELS-llama2-7b internlm2-1.8b}; do
  echo "-- $shape: lmd bench generation (decode, then 2048-token prefill; first token ms = prefill)"
  grep -E "^ *(batch| +[0-9]+ +[0-9]+ +[0-9]+ )" "$LOGS/gen-$shape.log" "$LOGS/prefill-$shape.log" \
    "$LOGS/gen-$shape"-ab.log 2>/dev/null |
    sed "s|$LOGS/||" || true
  grep -iE "error|lmd:" "$LOGS/gen-$shape.log" | tail -3
  if [[ -f "$LOGS/hf-$shape.log" ]]; then
    echo "-- $shape: transformers"
    tail -2 "$LOGS/hf-$shape.log"
  fi
done
if [[ "${LMD_GPU_KV:-0}" == 1 ]]; then
  for qp in 0 8 4; do
    echo "-- Llama-2-7B shape, --quant-policy $qp, batch 64, 2048-token prompts"
    grep -E "KV cache|quantized KV" "$LOGS/kv-$qp.log" | head -3
    grep -E "^ *(batch| +[0-9]+ +[0-9]+ +[0-9]+ )" "$LOGS/kv-$qp.log" || tail -3 "$LOGS/kv-$qp.log"
    python3 -c 'import json, sys; r = json.load(open(sys.argv[1]))["results"][0]
print("steady decode %.1f tok/s (%.1f GB/s), decode %.1f tok/s, p50 token gap %.2f ms, %d preemptions" % (
    r["steady_decode_tokens_per_s"], r["steady_achieved_gb_per_s"], r["decode_tokens_per_s"],
    1e3 * r["token_latency_s"]["p50"], r["preemptions"]))' "$LOGS/kv-$qp.json" 2>/dev/null
  done
fi
if [[ "${LMD_GPU_AWQ:-0}" == 1 ]]; then
  for log in "$LOGS"/awq-False.log "$LOGS"/awq-True.log; do
    [[ -f $log ]] || continue
    echo "-- InternLM2-1.8B shape, $(tail -1 "$log")"
    grep -E "^lmd: (calibration|layer 1/|wrote)|rror" "$log" | head -5
    # Per-phase seconds summed over the layers (the per-layer line's parenthesis).
    awk '/^lmd: layer /{for (i = 1; i <= NF; ++i) if ($(i + 2) ~ /^s[,)]/) t[$i] += $(i + 1)}
      END {printf "layers in all:"; for (k in t) printf " %s %.1f s", k, t[k]; print ""}' "$log" | tr -d '('
  done
  echo "-- lmd bench generation on the AWQ output"
  grep -E "^ *(batch| +[0-9]+ +[0-9]+ +[0-9]+ )" "$LOGS/awq-gen.log" || tail -3 "$LOGS/awq-gen.log"
fi
exit $((tests_rc != 0 || bench_rc != 0 || e2e_rc != 0 || kv_rc != 0 || awq_rc != 0))
