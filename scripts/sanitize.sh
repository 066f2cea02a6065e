#!/usr/bin/env bash
# Builds lmd (CPU only) with a sanitizer and runs the CPU tests and the server's end-to-end suites under it.
#   scripts/sanitize.sh address|thread [CATCH2_FILTER]
# Each build takes about 10 min on 2 cores.
# address: AddressSanitizer + UndefinedBehaviorSanitizer, into build-asan; lmd_tests takes about 25 min,
#          16 of them the auto_awq perplexity test.
# thread:  ThreadSanitizer, into build-tsan; about 8 min after the build. The perplexity tests are left
#          out by default: they only run the thread pool, which the other tests also cover, and the
#          auto_awq one was still running when a 30 min run was stopped.
# Not part of CI (too slow for its budget); run it after changing threading or memory handling. Needs the
# packages scripts/setup.sh installs, and for the end-to-end suites what scripts/test.sh installs.
set -euo pipefail
cd "$(dirname "$0")/.."
kind=${1:?usage: scripts/sanitize.sh address|thread [CATCH2_FILTER]}
case $kind in
  address)
    build=build-asan
    flags="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined"
    filter=${2:-}
    ;;
  thread)
    build=build-tsan
    flags="-fsanitize=thread"
    filter=${2:-~*perplexity*}
    ;;
  *) echo "scripts/sanitize.sh: expected address or thread, got '$kind'" >&2; exit 2 ;;
esac
cmake -S . -B "$build" -DLMD_CUDA=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS="$flags" \
  -DCMAKE_EXE_LINKER_FLAGS="$flags" >/dev/null
cmake --build "$build" -j"$(nproc)"
# Reports go to files, so that those of the servers the end-to-end suites start are seen too.
reports=$(mktemp -d)
export ASAN_OPTIONS=detect_leaks=1:log_path=$reports/asan UBSAN_OPTIONS=print_stacktrace=1:log_path=$reports/ubsan
export TSAN_OPTIONS=halt_on_error=0:log_path=$reports/tsan
status=0
"$build/tests/lmd_tests" ${filter:+"$filter"} || status=1
python3 tests/e2e/test_server.py --lmd "$build/lmd" --scripted-server "$build/tests/lmd_scripted_server" || status=1
python3 tests/e2e/test_web_chat.py --lmd "$build/lmd" || status=1
if compgen -G "$reports/*" >/dev/null; then
  cat "$reports"/*
  echo "scripts/sanitize.sh $kind: sanitizer reports above (also in $reports)"
  exit 1
fi
[ $status -eq 0 ] || { echo "scripts/sanitize.sh $kind: a test failed"; exit 1; }
echo "scripts/sanitize.sh $kind: every test passed with no sanitizer report"
