#!/usr/bin/env bash
# Quick start on a bare Debian machine with Node 20: installs what the build needs (the native
# modules lz4 and better-sqlite3 compile with node-gyp: python3, make, g++), the npm packages
# from the lock file, builds, and runs the demo on the embedded default (server + agent on
# loopback, a disk image replicated, changed, replicated again and verified).
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
for pair in python3:python3 make:make g++:g++; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need_pkgs+=("${pair#*:}")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends "${need_pkgs[@]}"
fi

npm ci --no-audit --no-fund
npm run demo
