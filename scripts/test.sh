#!/usr/bin/env bash
# Sets up, builds and runs every test that this machine can run (GPU tests skip without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cd build && ctest --output-on-failure "$@"
