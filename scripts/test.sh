#!/usr/bin/env bash
# Installs what the test suite needs (Debian packages, npm packages from the
# lock file), builds with strict TypeScript, and runs every test.
# Real tools are required, never optional: a missing one fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/need-packages.sh
# native npm modules (lz4, better-sqlite3) build with node-gyp: python3, make, g++;
# push-install tests create a non-root account (useradd) and run a private sshd
install_missing sshd:openssh-server ssh:openssh-client ssh-keygen:openssh-client rsync:rsync fio:fio mkfs.ext4:e2fsprogs e2fsck:e2fsprogs mount:mount sfdisk:fdisk partx:util-linux fsfreeze:util-linux setpriv:util-linux flock:util-linux losetup:mount useradd:passwd tar:tar gzip:gzip python3:python3 make:make g++:g++
# host mode (the QEMU change tracker): a real qemu-storage-daemon serves the disks, qemu-io writes
# as a guest would, nbdinfo reads dirty bitmaps over NBD (nbdcopy, same package, for the data path)
install_missing qemu-storage-daemon:qemu-system-common qemu-img:qemu-utils qemu-io:qemu-utils nbdinfo:libnbd-bin nbdcopy:libnbd-bin
# boot check of test failover: QEMU boots the recovered images (the bootable test disk's kernel, busybox and
# extlinux come with apt-get download at test time and are cached in $TMPDIR/mobility-test-debs)
install_missing qemu-system-x86_64:qemu-system-x86
# app-consistent points in host mode: the real QEMU guest agent (qemu-ga) runs on this host, in a mount
# namespace of its own (unshare) that shows it only the loop filesystems it may freeze
install_missing qemu-ga:qemu-guest-agent unshare:util-linux
# the operator console's browser test drives a real headless Chromium (playwright-core, no browser download)
install_missing chromium:chromium

# the change tracker needs tracefs (the agent mounts it itself; tests check for it up front)
[ -d /sys/kernel/tracing/instances ] || mount -t tracefs tracefs /sys/kernel/tracing || echo "warning: cannot mount tracefs; the e2e tests will fail" >&2

npm ci --no-audit --no-fund
rm -rf dist # files of removed tests must not run
npm run build

# Residue of earlier runs whose test process is dead (killed on a timeout, the machine
# stopped...): processes, trace instances, mounts, loop devices, test accounts and the
# scratch directories under $TMPDIR/mobility-test/. Runs whose owner is alive are left alone.
node dist/test/cleanup.js --sweep || echo "warning: the sweep could not clean everything (see above)" >&2

log=$(mktemp)
set +e
mapfile -t files < <(find dist/test -name '*.test.js' | sort)
[ ${#files[@]} -gt 0 ] || { echo "no test files were built" >&2; exit 1; }
npx tap "${files[@]}" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
summary=$(grep -E '^# \{ total: ' "$log" | tail -n 1)
pass=$(sed -nE 's/.*pass: ([0-9]+).*/\1/p' <<<"$summary")
fail=$(sed -nE 's/.*fail: ([0-9]+).*/\1/p' <<<"$summary")
echo "longest test files:"
# awk reads all of sort's output: `head` would close the pipe early and, under pipefail, sort's SIGPIPE (141) became the suite's exit code
grep -E '^(not )?ok [0-9]+ - .* # time=' "$log" | sed -E 's/^(not )?ok [0-9]+ - (.*) # time=([0-9.]+)ms.*/\3 \2 \1/' \
  | sort -rn | awk 'NR <= 12 { printf "  %7.1f s  %s%s\n", $1 / 1000, $2, ($3 == "not" ? "  (failed)" : "") }' || true
rm -f "$log"
echo "tests: ${pass:-0} passed, ${fail:-0} failed"
if [ -z "$summary" ] || [ "${pass:-0}" -eq 0 ]; then echo "no tests ran" >&2; exit 1; fi
exit "$rc"
