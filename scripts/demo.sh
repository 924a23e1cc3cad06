#!/usr/bin/env bash
# Quick start on a bare Debian machine with Node 20: installs what the build needs (the native
# modules lz4 and better-sqlite3 compile with node-gyp: python3, make, g++), the npm packages
# from the lock file, builds, and runs the demo on the embedded default (server + agent on
# loopback, a disk image replicated, changed, replicated again and verified).
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/need-packages.sh
install_missing python3:python3 make:make g++:g++

npm ci --no-audit --no-fund
npm run demo
