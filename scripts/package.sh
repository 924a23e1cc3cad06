#!/usr/bin/env bash
# Builds the pull-install bundle of the Mobility agent (`npm run package`):
#
#   dist/bundle/mobility-agent-<version>-linux-<arch>.tar.gz
#     mobility-agent-<version>/
#       dist/src/**.js  proto/  bin/mobility.js  package.json  package-lock.json
#       node_modules/ (production only)  install.sh  uninstall.sh
#       mobility-agent.service.in  VERSION
#
# The bundle runs on the target machine's own Node.js 20+. Native modules
# (lz4, better-sqlite3, ...) are shipped as built here, i.e. for this
# machine's platform/arch and Node ABI (Node 20 on linux-x64): install.sh
# checks that the target's node can load them and refuses otherwise.
#
# node_modules is copied from the working tree and pruned to production
# dependencies (npm prune --omit=dev); nothing is installed or rebuilt, so
# packaging needs no network and no compiler.
#
# Options:
#   --skip-build     use the existing dist/ instead of running `npm run build`
#                    (the install test does this: it runs from dist/ itself)
#   --out-dir DIR    write the tar.gz into DIR (default: dist/bundle)
#
# Prints the bundle path, its size and the time taken. Exit 0 on success.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$root"

skip_build=0
out_dir="$root/dist/bundle"
while [ $# -gt 0 ]; do
  case "$1" in
    --skip-build) skip_build=1; shift ;;
    --out-dir) [ $# -ge 2 ] || { echo "package.sh: --out-dir needs a value" >&2; exit 2; }; out_dir=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "package.sh: unknown option: $1" >&2; exit 2 ;;
  esac
done

t0=$(date +%s%N)
say() { printf 'package: %s\n' "$*"; }

if [ "$skip_build" = 0 ]; then
  say "building (npm run build)"
  npm run --silent build
fi

version=$(node -p "require('./package.json').version")
arch=$(node -p process.arch)
name="mobility-agent-$version"
tarball="$name-linux-$arch.tar.gz"

# Every compiled source must be present; compiled files without a source
# (left over from a deleted .ts) are not shipped.
missing=0
while IFS= read -r -d '' ts; do
  js="dist/${ts%.ts}.js"
  if [ ! -f "$js" ]; then echo "package.sh: $js is missing (build first)" >&2; missing=1; fi
done < <(find src -type f -name '*.ts' ! -name '*.d.ts' -print0)
[ "$missing" = 0 ] || exit 1

stage_parent=$(mktemp -d "${TMPDIR:-/tmp}/mobility-package.XXXXXX")
trap 'rm -rf "$stage_parent"' EXIT
stage="$stage_parent/$name"
mkdir -p "$stage/dist" "$stage/bin"

say "staging $name"
# dist/ mirrors the repository (rootDir "."): dist/src/x.js comes from src/x.ts.
js_list="$stage_parent/js-files"
: >"$js_list"
while IFS= read -r -d '' js; do
  if [ -f "${js%.js}.ts" ]; then printf '%s\0' "$js" >>"$js_list"
  else echo "package.sh: warning: dist/$js has no source (stale build output), not shipped" >&2; fi
done < <(cd dist && find src -type f -name '*.js' -print0)
tar -C dist --null -T "$js_list" -cf - | tar -C "$stage/dist" -xf -
rm -f "$js_list"

cp -R proto "$stage/proto"
cp bin/mobility.js "$stage/bin/mobility.js"
chmod 0755 "$stage/bin/mobility.js"
cp package.json package-lock.json "$stage/"
cp packaging/install.sh packaging/uninstall.sh packaging/mobility-agent.service.in "$stage/"
chmod 0755 "$stage/install.sh" "$stage/uninstall.sh"
chmod 0644 "$stage/mobility-agent.service.in"
printf '%s\n' "$version" >"$stage/VERSION"

say "copying node_modules and pruning dev dependencies"
cp -a node_modules "$stage/node_modules"
(cd "$stage" && npm prune --omit=dev --no-audit --no-fund --ignore-scripts --loglevel=error >/dev/null)
# What prune leaves behind that nothing loads: empty scope directories,
# caches, and node-gyp intermediates (object files, static libraries; the
# loadable .node files stay in build/Release).
find "$stage/node_modules" -mindepth 1 -maxdepth 1 -name '@*' -type d -empty -delete
rm -rf "$stage/node_modules/.cache"
find "$stage/node_modules" -type d -path '*/build/Release' -print0 |
  while IFS= read -r -d '' rel; do
    rm -rf "$rel/obj" "$rel/obj.target" "$rel/.deps"
    find "$rel" -maxdepth 1 -type f -name '*.a' -delete
  done

mkdir -p "$out_dir"
out_dir=$(cd "$out_dir" && pwd -P)
say "writing $tarball"
tar -C "$stage_parent" --sort=name --owner=0 --group=0 --numeric-owner \
  -czf "$out_dir/$tarball.tmp" "$name"
mv -f "$out_dir/$tarball.tmp" "$out_dir/$tarball"

t1=$(date +%s%N)
bytes=$(stat -c %s "$out_dir/$tarball")
files=$(find "$stage" -type f | wc -l)
printf 'bundle: %s\n' "$out_dir/$tarball"
printf 'size:   %s bytes (%s MiB, %s files)\n' "$bytes" "$(awk -v b="$bytes" 'BEGIN{printf "%.1f", b/1048576}')" "$files"
printf 'time:   %s s\n' "$(awk -v n=$((t1 - t0)) 'BEGIN{printf "%.1f", n/1e9}')"
