#!/usr/bin/env bash
# Quick start on a bare Debian machine with Node 20: installs what the build needs (the native
# modules lz4, better-sqlite3 and cpu-features compile with node-gyp: python3, make, g++), the
# npm packages from the lock file, builds, and runs the demo. As root (with tracefs) the demo
# shows the whole product on a loop device: server, registered agent daemon, enable,
# continuous protection with recovery points, a test failover checked by e2fsck and checksums,
# and the console URL; it also needs e2fsprogs (mkfs.ext4, e2fsck) and util-linux (losetup,
# fsfreeze), installed here. Otherwise: a disk image replicated, changed, replicated again and
# verified.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/need-packages.sh
install_missing python3:python3 make:make g++:g++
if [ "$(id -u)" -eq 0 ]; then
  install_missing mkfs.ext4:e2fsprogs e2fsck:e2fsprogs losetup:mount fsfreeze:util-linux
  # the demo's agent tracks writes through tracefs
  if [ ! -d /sys/kernel/tracing/instances ] && [ ! -d /sys/kernel/debug/tracing/instances ]; then
    mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null || echo "note: tracefs is not mounted and cannot be: the demo falls back to the file-based one" >&2
  fi
fi

npm ci --no-audit --no-fund
npm run demo
