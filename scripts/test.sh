#!/usr/bin/env bash
# Sets up, builds and runs every test that this machine can run (GPU tests skip without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The server's end-to-end suite drives `lmd serve` with the official openai client (test-only).
python3 -c "import openai" 2>/dev/null || python3 -m pip install -q openai || echo "lmd: openai package unavailable; its server tests will skip"
cd build && ctest --output-on-failure "$@"
