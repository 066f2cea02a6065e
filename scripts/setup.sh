#!/usr/bin/env bash
# Installs the Debian 12 packages lmd builds with and builds it into ./build.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
PKGS="cmake g++ make pkg-config libcli11-dev nlohmann-json3-dev libsentencepiece-dev catch2 libcpp-httplib-dev"
missing=""
for p in $PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  echo "lmd: installing$missing"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing
fi
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release ${LMD_CMAKE_ARGS:-} >/dev/null
cmake --build build -j "$(nproc)"
