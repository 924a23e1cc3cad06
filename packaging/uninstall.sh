#!/usr/bin/env bash
# Removes the Mobility agent that install.sh installed.
#
#   sudo ./uninstall.sh [--prefix DIR] [--keep-state] [--dry-run]
#
# Contract:
# - Stops the agent (systemctl disable --now under / with systemd, else
#   SIGTERM to the pid in var/lib/mobility/agent.pid, waiting up to 60 s).
# - Removes what PREFIX/var/lib/mobility/install-manifest lists: files and
#   links, then directories deepest first and only when empty; the product
#   trees opt/mobility and var/lib/mobility (and etc/mobility, var/log/mobility
#   when install.sh created them) go with their contents. --keep-state keeps
#   var/lib/mobility (credentials, digest maps) and etc/mobility.
# - Without a manifest it removes the well-known paths only, and says so.
# - Installed as PREFIX/opt/mobility/uninstall.sh too: run from there, PREFIX
#   defaults to the prefix it is installed under (it deletes its own directory;
#   bash has read the whole script before anything is removed).
# - Idempotent: a second run finds nothing and exits 0.
# - Last line of stdout: "MOBILITY-UNINSTALL ok", "MOBILITY-UNINSTALL dry-run"
#   or "MOBILITY-UNINSTALL fail <MOB_ERR_CODE> <message>". Exit codes: 0 ok,
#   2 usage, 10 not root, 12 removal failed.
set -euo pipefail

main() {
  local self_dir
  self_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
  cd /
  trap 'fail MOB_ERR_INTERNAL 12 "unexpected failure at uninstall.sh line $LINENO: $BASH_COMMAND"' ERR
  set -E

  PREFIX='' KEEP_STATE=0 DRY_RUN=0
  while [ $# -gt 0 ]; do
    case "$1" in
      --prefix) { [ $# -ge 2 ] && [ -n "$2" ]; } || usage_error "option --prefix needs a value"; PREFIX=$2; shift ;;
      --prefix=?*) PREFIX=${1#--prefix=} ;;
      --keep-state) KEEP_STATE=1 ;;
      --dry-run) DRY_RUN=1 ;;
      -h|--help) sed -n '3,4p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
      *) usage_error "unknown option: $1" ;;
    esac
    shift
  done
  if [ -z "$PREFIX" ]; then
    # Run as PREFIX/opt/mobility/uninstall.sh: uninstall that installation.
    if [ "$(basename "$self_dir")" = mobility ] && [ "$(basename "$(dirname "$self_dir")")" = opt ]; then
      PREFIX=$(dirname "$(dirname "$self_dir")")
    else
      PREFIX=/
    fi
  fi
  if ! [[ "$PREFIX" =~ ^/[A-Za-z0-9._/+-]*$ ]] || [[ "/$PREFIX/" == */../* ]]; then
    usage_error "--prefix must be an absolute path of [A-Za-z0-9._/+-] without '..' (got '$PREFIX')"
  fi
  while [ "${#PREFIX}" -gt 1 ] && [ "${PREFIX%/}" != "$PREFIX" ]; do PREFIX=${PREFIX%/}; done
  if [ "$PREFIX" = / ]; then P=''; else P=$PREFIX; fi
  CONF="$P/etc/mobility/agent.json"
  STATE="$P/var/lib/mobility"
  PIDFILE="$STATE/agent.pid"
  MANIFEST="$STATE/install-manifest"
  UNIT_REL=etc/systemd/system/mobility-agent.service
  if [ -z "$P" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then SYSTEMD=1; else SYSTEMD=0; fi

  if [ "$DRY_RUN" = 1 ]; then
    echo "Mobility agent: uninstall plan for prefix $PREFIX (dry run: nothing is changed)"
    ACT="would remove"
  else
    [ "$(id -u)" = 0 ] || fail MOB_ERR_PRE_NOT_ROOT 10 "uninstall.sh must run as root (uid $(id -u)); use sudo"
    echo "Mobility agent: uninstalling from prefix $PREFIX"
    ACT="removed"
    # One install.sh/uninstall.sh at a time per prefix (lock on the directory itself).
    if command -v flock >/dev/null 2>&1 && [ -d "$PREFIX" ]; then
      exec 9<"$PREFIX"
      flock -n 9 || fail MOB_ERR_INTERNAL 12 "another install.sh or uninstall.sh is running for prefix $PREFIX"
    fi
  fi

  read_manifest
  if [ "${#TREES[@]}" -eq 0 ] && [ "${#FILES[@]}" -eq 0 ] && [ "${#DIRS[@]}" -eq 0 ]; then
    echo "nothing of the Mobility agent is installed under $PREFIX"
    [ "$DRY_RUN" = 1 ] && echo "MOBILITY-UNINSTALL dry-run" || echo "MOBILITY-UNINSTALL ok"
    return 0
  fi

  stop_agent
  remove_trace_instance

  local rel unit_removed=0
  for rel in "${TREES[@]+"${TREES[@]}"}"; do
    if kept "$rel"; then echo "kept $P/$rel (--keep-state)"; continue; fi
    [ -e "$P/$rel" ] || continue
    [ "$DRY_RUN" = 1 ] || rm -rf "$P/${rel:?}" || fail MOB_ERR_INTERNAL 12 "cannot remove $P/$rel"
    echo "$ACT $P/$rel/"
  done
  for rel in "${FILES[@]+"${FILES[@]}"}"; do
    if kept "$rel" || under_tree "$rel"; then continue; fi
    [ -e "$P/$rel" ] || [ -L "$P/$rel" ] || continue
    [ "$DRY_RUN" = 1 ] || rm -f "$P/$rel" || fail MOB_ERR_INTERNAL 12 "cannot remove $P/$rel"
    echo "$ACT $P/$rel"
    [ "$rel" != "$UNIT_REL" ] || unit_removed=1
  done
  # Deepest first: in reverse order a directory comes after everything inside it.
  while IFS= read -r rel; do
    [ -n "$rel" ] || continue
    if kept "$rel" || under_tree "$rel"; then continue; fi
    [ -d "$P/$rel" ] || continue
    if [ "$DRY_RUN" = 1 ]; then
      echo "$ACT $P/$rel/ (if empty)"
    elif rmdir "$P/$rel" 2>/dev/null; then
      echo "$ACT $P/$rel/"
    else
      echo "left $P/$rel/ (not empty)"
    fi
  done < <(printf '%s\n' "${DIRS[@]+"${DIRS[@]}"}" | LC_ALL=C sort -r)

  if [ "$SYSTEMD" = 1 ] && [ "$unit_removed" = 1 ] && [ "$DRY_RUN" = 0 ]; then
    systemctl daemon-reload || true
    echo "ran systemctl daemon-reload"
  fi
  [ "$DRY_RUN" = 1 ] && echo "MOBILITY-UNINSTALL dry-run" || echo "MOBILITY-UNINSTALL ok"
}

fail() {
  local msg
  msg=$(printf '%s' "$3" | tr '\n\t' '  ')
  trap - ERR
  echo "uninstall.sh: error: $msg [$1]" >&2
  echo "MOBILITY-UNINSTALL fail $1 $msg"
  exit "$2"
}

usage_error() {
  echo "Usage: uninstall.sh [--prefix DIR] [--keep-state] [--dry-run]" >&2
  fail MOB_ERR_USAGE 2 "$1"
}

# TREES, FILES (files and links) and DIRS from the manifest, or the well-known
# paths when there is none. opt/mobility and var/lib/mobility are always trees.
read_manifest() {
  TREES=() FILES=() DIRS=()
  local type rel
  if [ -f "$MANIFEST" ]; then
    while read -r type rel; do
      [ -n "$type" ] || continue
      if ! [[ "$rel" =~ ^[A-Za-z0-9._+-][A-Za-z0-9._/+-]*$ ]] || [[ "/$rel/" == */../* || "/$rel/" == */./* ]]; then
        echo "warning: ignoring manifest entry '$type $rel'" >&2; continue
      fi
      case "$type" in
        tree) TREES+=("$rel") ;;
        file|link) FILES+=("$rel") ;;
        dir) DIRS+=("$rel") ;;
        *) echo "warning: ignoring manifest entry '$type $rel'" >&2 ;;
      esac
    done <"$MANIFEST"
  elif [ -e "$P/opt/mobility" ] || [ -e "$STATE" ] || [ -e "$P/$UNIT_REL" ]; then
    echo "warning: no $MANIFEST: removing the well-known paths only (their parent directories stay)" >&2
    FILES=("$UNIT_REL" etc/mobility/agent.json)
    if [ "$(readlink "$P/usr/local/bin/mobility" 2>/dev/null || true)" = ../../../opt/mobility/bin/mobility.js ]; then
      FILES+=(usr/local/bin/mobility)
    fi
    TREES=(var/log/mobility)
    DIRS=(etc/mobility)
  else
    return 0
  fi
  local t have_app=0 have_state=0
  for t in "${TREES[@]+"${TREES[@]}"}"; do
    [ "$t" != opt/mobility ] || have_app=1
    [ "$t" != var/lib/mobility ] || have_state=1
  done
  [ "$have_app" = 1 ] || TREES+=(opt/mobility)
  [ "$have_state" = 1 ] || TREES+=(var/lib/mobility)
}

# kept REL: REL is inside what --keep-state keeps.
kept() {
  [ "$KEEP_STATE" = 1 ] || return 1
  case "$1" in
    var/lib/mobility|var/lib/mobility/*|etc/mobility|etc/mobility/*) return 0 ;;
  esac
  return 1
}

# under_tree REL: REL lies inside a tree that was removed with its contents.
under_tree() {
  local t
  for t in "${TREES[@]+"${TREES[@]}"}"; do
    if kept "$t"; then continue; fi
    case "$1" in "$t"/*) return 0 ;; esac
  done
  return 1
}

# running PID: the process exists and is not a zombie (a detached agent is
# reaped by init, which some containers' init does late or never).
running() {
  local st
  kill -0 "$1" 2>/dev/null || return 1
  st=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  st=${st##*) }
  [ "${st:0:1}" != Z ]
}

stop_agent() {
  if [ "$SYSTEMD" = 1 ] && { [ -f "/$UNIT_REL" ] || systemctl is-active --quiet mobility-agent 2>/dev/null; }; then
    if [ "$DRY_RUN" = 1 ]; then echo "would run systemctl disable --now mobility-agent"
    else
      systemctl disable --now mobility-agent >/dev/null 2>&1 || echo "warning: systemctl disable --now mobility-agent failed" >&2
      echo "stopped and disabled mobility-agent (systemd)"
    fi
  fi
  local pid cmd i
  [ -f "$PIDFILE" ] || return 0
  pid=$(tr -cd '0-9' <"$PIDFILE")
  [ -n "$pid" ] && running "$pid" || return 0
  cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 0
  [[ "$cmd" == *"$CONF"* || "$cmd" == *mobility* ]] || return 0
  if [ "$DRY_RUN" = 1 ]; then echo "would stop the agent (pid $pid, SIGTERM)"; return 0; fi
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 600; i++)); do running "$pid" || break; sleep 0.1; done
  if running "$pid"; then
    echo "warning: the agent (pid $pid) did not exit within 60 s of SIGTERM: killing it" >&2
    kill -KILL "$pid" 2>/dev/null || true
  fi
  echo "stopped the agent (pid $pid)"
}

# The agent's kernel trace instance (it keeps recording across agent restarts, so
# stopping the agent leaves it). The agent records its name in
# protect/<agent id>/trace-instance (mobility-<agent id>-<digest of the state dir>: unique to
# this installation), and that of profiling in profile/<agent id>/trace-instance. Agents before 0.2 named it mobility-<agent id> and recorded nothing: that
# name is derived from the agent id in identity.json. An instance locked by a live process
# (/run/mobility/trace-locks/NAME.lock holds "pid starttime") is in use and is never removed.
# rmdir alone, never enable=0 first: the kernel disables it as it removes it.
remove_trace_instance() {
  local f name names=() agent
  # profile/<agent id>/trace-instance: the instance of profile-only disks (capacity planning)
  for f in "$STATE"/protect/*/trace-instance "$STATE"/profile/*/trace-instance; do
    [ -f "$f" ] || continue
    name=$(head -n 1 "$f" | tr -cd 'A-Za-z0-9._-')
    if [ -n "$name" ]; then names+=("$name"); fi
  done
  if [ -f "$STATE/identity.json" ]; then
    agent=$(sed -n 's/.*"agentId"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p' "$STATE/identity.json" | head -n 1)
    if [[ "$agent" =~ ^[A-Za-z0-9._-]{1,64}$ ]] && [ "$agent" != . ] && [ "$agent" != .. ]; then names+=("mobility-$agent"); fi
  fi
  local seen=' '
  for name in "${names[@]+"${names[@]}"}"; do
    case "$seen" in *" $name "*) continue ;; esac
    seen="$seen$name "
    remove_one_trace_instance "$name"
  done
}

remove_one_trace_instance() {
  local name=$1 root dir lock pid start now found
  lock="/run/mobility/trace-locks/$name.lock"
  if [ -f "$lock" ]; then
    read -r pid start <"$lock" || true
    # field 22 (start time) of a live process; a zombie (state Z) holds nothing
    now=$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | awk '$1 != "Z" && $1 != "X" { print $20 }')
    if [ -n "$pid" ] && [ -n "$now" ] && [ "$now" = "$start" ]; then
      echo "warning: the trace instance $name is in use by process $pid (MOB_ERR_TRACKER_BUSY): left in place" >&2
      return 0
    fi
  fi
  for root in /sys/kernel/tracing /sys/kernel/debug/tracing; do
    found=0
    # the instance and its shadow (same events, read only to recover a read the agent was killed in)
    for dir in "$root/instances/$name" "$root/instances/$name.shadow"; do
      [ -d "$dir" ] || continue
      found=1
      if [ "$DRY_RUN" = 1 ]; then echo "would remove the trace instance $dir"; continue; fi
      rmdir "$dir" 2>/dev/null && echo "removed the trace instance $dir" || echo "warning: cannot remove the trace instance $dir" >&2
    done
    if [ "$found" = 1 ]; then break; fi
  done
  return 0
}

# On one line: bash has read it all before main runs, so removing this file's
# directory (run as PREFIX/opt/mobility/uninstall.sh) cannot affect it.
main "$@"; exit 0
