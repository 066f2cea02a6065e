#!/usr/bin/env bash
# Sets up, builds and runs every test that this machine can run (GPU tests skip without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The server's end-to-end suite drives `lmd serve` with the official openai client (test-only).
python3 -c "import openai" 2>/dev/null || python3 -m pip install -q openai || echo "lmd: openai package unavailable; its server tests will skip"
# The web chat test drives /chat in headless Chromium through selenium (test-only; it skips without them).
if ! command -v chromedriver >/dev/null; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  { $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } ||
    echo "lmd: chromium unavailable; the web chat test will skip"
fi
python3 -c "import selenium" 2>/dev/null || python3 -m pip install -q selenium || echo "lmd: selenium unavailable; the web chat test will skip"
cd build && ctest --output-on-failure "$@"
