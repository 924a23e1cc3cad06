#!/usr/bin/env bash
# Installs (or upgrades in place) the Mobility agent from an unpacked bundle.
#
#   sudo ./install.sh --server URL (--passphrase-file F | --token-file F) [--pin FP]
#                     [--prefix DIR] [--dry-run] [--no-start] [--no-register]
#                     [--skip-preflight] [--node PATH]
#
# Layout (every path is under PREFIX, default /):
#   opt/mobility/                          the bundle (program, node_modules, these scripts)
#   etc/mobility/agent.json                configuration, mode 0600
#   var/lib/mobility/                      state, mode 0700 (credentials from `register`)
#   var/lib/mobility/install-manifest      what this script created, for uninstall.sh
#   var/log/mobility/                      logs
#   etc/systemd/system/mobility-agent.service
#   usr/local/bin/mobility -> ../../../opt/mobility/bin/mobility.js
#
# Contract (callers: an administrator, or the server's push install over SSH):
# - The steps are planned first and printed as "[i/n] action"; --dry-run prints
#   the plan, changes nothing and needs no root.
# - Idempotent: running it again with the same arguments gives the same
#   result; with a new bundle it upgrades in place and keeps the state.
# - --server and the secret file are optional on an upgrade: the server comes
#   from the existing agent.json, and registration is skipped when no secret
#   file is given, the state holds agent.pem and the server is unchanged (with
#   a secret file the agent registers again and keeps its identity).
# - The secret files are passed by path to `mobility register`; their contents
#   are never read or printed by this script.
# - The last line of stdout is machine-readable:
#     MOBILITY-INSTALL ok <version>
#     MOBILITY-INSTALL dry-run <version>
#     MOBILITY-INSTALL fail <MOB_ERR_CODE> <one-line message>
#   Exit codes: 0 ok, 2 usage (MOB_ERR_USAGE), 3 configuration (MOB_ERR_CONFIG),
#   10 preconditions (MOB_ERR_PRE_NOT_ROOT, MOB_ERR_PRE_NODE_VERSION,
#   MOB_ERR_PREFLIGHT or the MOB_ERR_PRE_* code preflight reported),
#   11 registration (the MOB_ERR_* code `register` reported, else
#   MOB_ERR_NOT_REGISTERED), 12 install or start (MOB_ERR_PUSH_INSTALL_FAILED).
#
# Without systemd (containers, PREFIX other than /) the agent is started
# detached with setsid and a pid file; it is then NOT started at boot.

# The steps are called indirectly ("step_$id"):
# shellcheck disable=SC2317
set -euo pipefail

main() {
  umask 022
  BUNDLE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
  ORIG_PWD=$(pwd -P 2>/dev/null || echo /)
  # Out of any directory an upgrade replaces (opt/mobility itself, say);
  # relative paths in the arguments are resolved against ORIG_PWD.
  cd /
  VERSION=$(cat "$BUNDLE/VERSION" 2>/dev/null || echo unknown)
  trap 'on_err $LINENO "$BASH_COMMAND"' ERR
  set -E

  parse_args "$@"
  locate
  find_node
  inspect
  plan

  if [ "$DRY_RUN" = 1 ]; then
    echo "Mobility agent $VERSION: install plan for prefix $PREFIX (dry run: nothing is changed)"
    local i
    for i in "${!STEP_IDS[@]}"; do echo "[$((i + 1))/${#STEP_IDS[@]}] ${STEP_TEXT[$i]}"; done
    echo "MOBILITY-INSTALL dry-run $VERSION"
    return 0
  fi

  echo "Mobility agent $VERSION: installing into prefix $PREFIX"
  local i
  for i in "${!STEP_IDS[@]}"; do
    echo "[$((i + 1))/${#STEP_IDS[@]}] ${STEP_TEXT[$i]}"
    "step_${STEP_IDS[$i]}"
    flush_manifest
  done
  summary
  echo "MOBILITY-INSTALL ok $VERSION"
}

usage() {
  cat <<'EOF'
Usage: sudo ./install.sh --server URL (--passphrase-file F | --token-file F) [--pin FP]
                         [--prefix DIR] [--dry-run] [--no-start] [--no-register]
                         [--skip-preflight] [--node PATH]

  --server URL           server the agent connects to (ws:// or wss://); optional on an
                         upgrade (taken from the existing agent.json)
  --passphrase-file F    registration passphrase, read by `mobility register`
  --token-file F         one-time registration token, read by `mobility register`
  --pin FP               server certificate SHA-256 fingerprint to pin
  --prefix DIR           install under DIR instead of / (no systemd unit is activated)
  --dry-run              print the plan, change nothing (root not needed)
  --no-start             do not stop or start the agent
  --no-register          do not register (no secret file needed)
  --skip-preflight       do not run `mobility preflight`
  --node PATH            Node.js 20+ binary to use (default: node on PATH)
EOF
}

# --- failure reporting -------------------------------------------------------

# fail CODE EXIT MESSAGE: report on stderr, then the machine-readable line on stdout.
fail() {
  local code=$1 rc=$2 msg
  msg=$(printf '%s' "$3" | tr '\n\t' '  ')
  trap - ERR
  # Whatever was created before the failure is still uninstallable.
  if [ -n "${MANIFEST:-}" ] && [ "${DRY_RUN:-1}" = 0 ]; then flush_manifest || true; fi
  echo "install.sh: error: $msg [$code]" >&2
  echo "MOBILITY-INSTALL fail $code $msg"
  exit "$rc"
}

usage_error() {
  echo "Usage: sudo ./install.sh --server URL (--passphrase-file F | --token-file F) [options]; see --help" >&2
  fail MOB_ERR_USAGE 2 "$1"
}

on_err() {
  fail MOB_ERR_PUSH_INSTALL_FAILED 12 "unexpected failure at install.sh line $1: $2"
}

# --- arguments -----------------------------------------------------------------

parse_args() {
  SERVER='' PASS_FILE='' TOKEN_FILE='' PIN='' PREFIX='/' NODE_OPT=''
  DRY_RUN=0 NO_START=0 NO_REGISTER=0 SKIP_PREFLIGHT=0
  local opt val
  while [ $# -gt 0 ]; do
    opt=$1 val=''
    case "$opt" in
      --*=*) val=${opt#*=}; opt=${opt%%=*} ;;
    esac
    case "$opt" in
      --server|--passphrase-file|--token-file|--pin|--prefix|--node)
        if [ "$1" = "$opt" ]; then
          [ $# -ge 2 ] || usage_error "option $opt needs a value"
          val=$2; shift
        fi
        [ -n "$val" ] || usage_error "option $opt needs a non-empty value"
        case "$opt" in
          --server) SERVER=$val ;;
          --passphrase-file) PASS_FILE=$val ;;
          --token-file) TOKEN_FILE=$val ;;
          --pin) PIN=$val ;;
          --prefix) PREFIX=$val ;;
          --node) NODE_OPT=$val ;;
        esac ;;
      --dry-run|--no-start|--no-register|--skip-preflight)
        [ "$1" = "$opt" ] || usage_error "option $opt takes no value"
        case "$opt" in
          --dry-run) DRY_RUN=1 ;;
          --no-start) NO_START=1 ;;
          --no-register) NO_REGISTER=1 ;;
          --skip-preflight) SKIP_PREFLIGHT=1 ;;
        esac ;;
      -h|--help) usage; exit 0 ;;
      *) usage_error "unknown option: $1" ;;
    esac
    shift
  done

  if [ -n "$PASS_FILE" ] && [ -n "$TOKEN_FILE" ]; then
    usage_error "--passphrase-file and --token-file are mutually exclusive"
  fi
  if [ -n "$SERVER" ] && ! [[ "$SERVER" =~ ^wss?://[^[:space:]/]+(/[^[:space:]]*)?$ ]]; then
    usage_error "--server must be a ws:// or wss:// URL (got '$SERVER')"
  fi
  if [ -n "$PIN" ] && ! [[ "$PIN" =~ ^[A-Za-z0-9:+/=]+$ ]]; then
    usage_error "--pin must be a SHA-256 fingerprint (hex pairs separated by ':')"
  fi
  # The paths end up unquoted in the systemd unit: keep them to safe characters.
  if ! [[ "$PREFIX" =~ ^/[A-Za-z0-9._/+-]*$ ]] || [[ "/$PREFIX/" == */../* ]]; then
    usage_error "--prefix must be an absolute path of [A-Za-z0-9._/+-] without '..' (got '$PREFIX')"
  fi
  while [ "${#PREFIX}" -gt 1 ] && [ "${PREFIX%/}" != "$PREFIX" ]; do PREFIX=${PREFIX%/}; done
  PASS_FILE=$(absolute "$PASS_FILE")
  TOKEN_FILE=$(absolute "$TOKEN_FILE")
  NODE_OPT=$(absolute "$NODE_OPT")
}

absolute() {
  case "$1" in
    ''|/*) printf '%s' "$1" ;;
    *) printf '%s/%s' "${ORIG_PWD%/}" "$1" ;;
  esac
}

# lock_prefix: one install.sh at a time per prefix (the lock is on the prefix
# directory itself, so it leaves nothing behind). Needs flock (util-linux).
lock_prefix() {
  command -v flock >/dev/null 2>&1 || return 0
  [ -d "$PREFIX" ] || mkdir -p "$PREFIX"
  exec 9<"$PREFIX"
  flock -n 9 || fail MOB_ERR_PUSH_INSTALL_FAILED 12 "another install.sh or uninstall.sh is running for prefix $PREFIX"
}

# --- where things go -----------------------------------------------------------

locate() {
  if [ "$PREFIX" = / ]; then P=''; else P=$PREFIX; fi
  APP="$P/opt/mobility"
  CONF_DIR="$P/etc/mobility"
  CONF="$CONF_DIR/agent.json"
  STATE="$P/var/lib/mobility"
  LOGDIR="$P/var/log/mobility"
  UNIT="$P/etc/systemd/system/mobility-agent.service"
  LINK="$P/usr/local/bin/mobility"
  LINK_TARGET='../../../opt/mobility/bin/mobility.js'
  MANIFEST="$STATE/install-manifest"
  PIDFILE="$STATE/agent.pid"
  SECRET_FILE=${PASS_FILE:-$TOKEN_FILE}
  if [ -n "$PASS_FILE" ]; then SECRET_KIND=passphrase SECRET_OPT=--passphrase-file
  else SECRET_KIND=token SECRET_OPT=--token-file; fi
  # systemd only manages a real install: a unit written under a prefix is not seen by it.
  if [ -z "$P" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then SYSTEMD=1; else SYSTEMD=0; fi
}

# NODE (absolute path) and NODE_VER, or NODE_PROBLEM explaining why not.
find_node() {
  NODE='' NODE_VER='' NODE_PROBLEM=''
  local cand=${NODE_OPT:-$(command -v node 2>/dev/null || true)}
  if [ -z "$cand" ]; then NODE_PROBLEM="node not found on PATH (use --node PATH)"; return 0; fi
  case "$cand" in /*) ;; *) cand=$(absolute "$cand") ;; esac
  if [ ! -f "$cand" ] || [ ! -x "$cand" ]; then NODE_PROBLEM="$cand is not an executable file"; return 0; fi
  if ! [[ "$cand" =~ ^/[A-Za-z0-9._/+-]*$ ]]; then NODE_PROBLEM="node path $cand has characters a systemd unit cannot take unquoted"; return 0; fi
  NODE_VER=$("$cand" -p 'process.versions.node' 2>/dev/null) || { NODE_PROBLEM="$cand does not run"; return 0; }
  if [ "${NODE_VER%%.*}" -lt 20 ] 2>/dev/null; then NODE_PROBLEM="$cand is Node.js v$NODE_VER, 20 or newer is required"; return 0; fi
  NODE=$cand
  # Native modules (lz4, better-sqlite3) are built for one Node ABI and arch:
  # a node that cannot load them cannot run the agent.
  local out
  if ! out=$(cd "$BUNDLE" && "$NODE" -e "require('lz4'); new (require('better-sqlite3'))(':memory:').close()" 2>&1); then
    NODE_PROBLEM="Node.js v$NODE_VER at $NODE cannot load the bundle's native modules (they are built for Node.js 20 on linux-x64): $(grep -m1 -E 'Error|compiled' <<<"$out" || head -n1 <<<"$out")"
    NODE=''
  fi
}

# Reads the current install: existing config, registration, running agent.
inspect() {
  OLD_SERVER='' REGISTERED=0 RUNNING=''
  if [ -f "$CONF" ]; then
    OLD_SERVER=$(conf_get server) || fail MOB_ERR_CONFIG 3 "$CONF is not valid JSON; fix or remove it"
  fi
  if [ -z "$SERVER" ]; then
    [ -n "$OLD_SERVER" ] || usage_error "--server is required (no existing $CONF to take it from)"
    SERVER=$OLD_SERVER
  fi
  # with a secret file the agent registers again (the server keeps its identity: same
  # machine id); without one an upgrade keeps the existing registration
  if [ -f "$STATE/agent.pem" ] && [ "$OLD_SERVER" = "$SERVER" ] && [ -z "$SECRET_FILE" ]; then REGISTERED=1; fi
  if [ "$NO_REGISTER" = 0 ] && [ "$REGISTERED" = 0 ] && [ -z "$SECRET_FILE" ]; then
    usage_error "--passphrase-file or --token-file is required to register (or --no-register)"
  fi
  if [ "$SYSTEMD" = 1 ] && systemctl is-active --quiet mobility-agent 2>/dev/null; then RUNNING=systemd
  elif pid_alive; then RUNNING=pidfile; fi
}

# conf_get KEY: a top-level string value of the existing agent.json ('' if
# absent); status 3 when the file is not JSON.
conf_get() {
  if [ -n "$NODE" ]; then
    CONF_PATH=$CONF KEY=$1 "$NODE" -e '
      let c; try { c = JSON.parse(require("fs").readFileSync(process.env.CONF_PATH, "utf8")); } catch (e) { process.exit(3); }
      const v = c && typeof c === "object" ? c[process.env.KEY] : undefined;
      process.stdout.write(typeof v === "string" ? v : "");'
  else
    sed -n "s/.*\"$1\"[[:space:]]*:[[:space:]]*\"\\([^\"]*\\)\".*/\\1/p" "$CONF" | head -n1
  fi
}

# --- the plan --------------------------------------------------------------------

STEP_IDS=()
STEP_TEXT=()
add() { STEP_IDS+=("$1"); STEP_TEXT+=("$2"); }

plan() {
  add root "check root"
  if [ -n "$NODE" ]; then add node "check node >= 20 (found: $NODE v$NODE_VER)"
  else add node "check node >= 20 (found: none; $NODE_PROBLEM)"; fi
  if [ "$NO_REGISTER" = 0 ] && [ "$REGISTERED" = 0 ]; then
    add secret "check $SECRET_KIND file $SECRET_FILE is readable"
  fi
  if [ "$SKIP_PREFLIGHT" = 0 ]; then add preflight "run preflight against $SERVER"
  else add skip "skip preflight (--skip-preflight)"; fi
  if [ "$NO_START" = 0 ] && [ -n "$RUNNING" ]; then
    if [ "$RUNNING" = systemd ]; then add stop "stop the running agent (systemctl stop mobility-agent)"
    else add stop "stop the running agent (SIGTERM to the pid in $PIDFILE, wait up to 60 s)"; fi
  fi
  add dirs "create $STATE (mode 0700) and $LOGDIR"
  add app "install app to $APP (copy to $APP.new, swap, remove $APP.old)"
  add link "link $LINK -> $LINK_TARGET"
  add config "write $CONF (mode 0600, server $SERVER${PIN:+, pin $PIN})"
  if [ "$NO_REGISTER" = 1 ]; then add skip "skip registration (--no-register)"
  elif [ "$REGISTERED" = 1 ]; then add skip "skip registration (already registered with $SERVER)"
  else add register "register with $SERVER using $SECRET_KIND file $SECRET_FILE${PIN:+ (pin $PIN)}"; fi
  if [ "$SYSTEMD" = 1 ]; then add unit "write $UNIT (and systemctl daemon-reload)"
  else add unit "write $UNIT"; fi
  add manifest "write $MANIFEST"
  if [ "$NO_START" = 1 ]; then add skip "skip start (--no-start)"
  elif [ "$SYSTEMD" = 1 ]; then add start_systemd "start the agent: systemctl enable mobility-agent, systemctl restart mobility-agent"
  elif [ -z "$P" ]; then add start_detached "start the agent detached (no systemd on this machine; it will not start at boot): pid file $PIDFILE, output $LOGDIR/agent.out"
  else add start_detached "start the agent detached (no systemd under a prefix): pid file $PIDFILE, output $LOGDIR/agent.out"; fi
}

# --- the steps (each runs only in a real install, in plan order) -------------------

step_skip() { :; }

step_root() {
  [ "$(id -u)" = 0 ] || fail MOB_ERR_PRE_NOT_ROOT 10 "install.sh must run as root (uid $(id -u)); use sudo"
  lock_prefix
}

step_node() {
  [ -n "$NODE" ] || fail MOB_ERR_PRE_NODE_VERSION 10 "Node.js 20 or newer is required: $NODE_PROBLEM"
}

step_secret() {
  { [ -f "$SECRET_FILE" ] && [ -r "$SECRET_FILE" ]; } || fail MOB_ERR_CONFIG 3 "$SECRET_KIND file $SECRET_FILE is not a readable file"
  [ -s "$SECRET_FILE" ] || fail MOB_ERR_CONFIG 3 "$SECRET_KIND file $SECRET_FILE is empty"
  if [ -n "$(find "$SECRET_FILE" -maxdepth 0 -perm /044 2>/dev/null)" ]; then
    echo "      warning: $SECRET_FILE is readable by group or others (chmod 600 it)" >&2
  fi
}

step_preflight() {
  local out code
  if out=$("$NODE" "$BUNDLE/dist/src/cli/main.js" preflight --server "$SERVER" --state-dir "$STATE" 2>&1); then
    indent <<<"$out"
    return 0
  fi
  indent <<<"$out" >&2
  code=$(grep -o -m1 'MOB_ERR_PRE_[A-Z0-9_]*' <<<"$out" | head -n1 || true)
  fail "${code:-MOB_ERR_PREFLIGHT}" 10 "preflight against $SERVER failed: $(grep -m1 -E 'MOB_ERR|[Ff]ail|[Ee]rror' <<<"$out" || head -n1 <<<"$out")"
}

step_stop() { stop_agent; }

step_dirs() {
  mkdirs "${STATE#"$P"/}" tree 0700
  mkdirs "${LOGDIR#"$P"/}" tree 0750
}

# The bundle's entries, copied by name: anything else lying in the unpacked
# directory (a token file uploaded next to it, say) stays out of the app.
BUNDLE_ENTRIES=(VERSION package.json package-lock.json bin dist node_modules proto
  install.sh uninstall.sh mobility-agent.service.in)

step_app() {
  local f
  for f in "${BUNDLE_ENTRIES[@]}" dist/src/cli/main.js bin/mobility.js; do
    [ -e "$BUNDLE/$f" ] || fail MOB_ERR_CONFIG 3 "the bundle in $BUNDLE is incomplete: $f is missing"
  done
  mkdirs opt dir 0755
  rm -rf "$APP.new" "$APP.old"   # leftovers of an interrupted run
  mkdir -m 0755 "$APP.new"
  # Owned by root whoever unpacked the bundle: root runs this code.
  for f in "${BUNDLE_ENTRIES[@]}"; do
    cp -R --preserve=mode,timestamps "$BUNDLE/$f" "$APP.new/$f" ||
      fail MOB_ERR_PUSH_INSTALL_FAILED 12 "copying $BUNDLE/$f to $APP.new failed"
  done
  chmod -R go-w "$APP.new"
  if [ -e "$APP" ]; then mv "$APP" "$APP.old"; fi
  mv "$APP.new" "$APP"
  rm -rf "$APP.old"
  record tree opt/mobility
}

step_link() {
  mkdirs usr/local/bin dir 0755
  if [ -e "$LINK" ] || [ -L "$LINK" ]; then
    if [ "$(readlink "$LINK" || true)" != "$LINK_TARGET" ]; then echo "      replacing the existing $LINK" >&2; fi
    rm -f "$LINK"
  fi
  ln -s "$LINK_TARGET" "$LINK"
  record link usr/local/bin/mobility
}

step_config() {
  mkdirs "${CONF_DIR#"$P"/}" tree 0750
  local tmp="$CONF.tmp.$$"
  # Existing keys are kept (upgrade); server/stateDir/logFile are set; pin is
  # set when given, kept when the server is unchanged, dropped otherwise.
  ( umask 077
    CONF_PATH=$CONF OUT=$tmp SERVER=$SERVER STATE_DIR=$STATE LOG_FILE="$LOGDIR/agent.log" PIN=$PIN \
      "$NODE" -e '
        const fs = require("fs"), e = process.env;
        let c = {};
        if (fs.existsSync(e.CONF_PATH)) {
          try { c = JSON.parse(fs.readFileSync(e.CONF_PATH, "utf8")); } catch { process.exit(3); }
          if (!c || typeof c !== "object" || Array.isArray(c)) process.exit(3);
        }
        const serverChanged = c.server !== e.SERVER;
        Object.assign(c, { server: e.SERVER, stateDir: e.STATE_DIR, logFile: e.LOG_FILE });
        if (e.PIN) c.pin = e.PIN; else if (serverChanged) delete c.pin;
        const fd = fs.openSync(e.OUT, "w", 0o600);
        fs.writeSync(fd, JSON.stringify(c, null, 2) + "\n");
        fs.fsyncSync(fd);
        fs.closeSync(fd);' ) || { rm -f "$tmp"; fail MOB_ERR_CONFIG 3 "$CONF is not a valid JSON object; fix or remove it"; }
  chmod 0600 "$tmp"
  mv -f "$tmp" "$CONF"
  record file etc/mobility/agent.json
}

step_register() {
  local out code args=(register --config "$CONF" --server "$SERVER" "$SECRET_OPT" "$SECRET_FILE")
  [ -z "$PIN" ] || args+=(--pin "$PIN")
  if out=$("$NODE" "$APP/dist/src/cli/main.js" "${args[@]}" 2>&1); then
    indent <<<"$out"
    return 0
  fi
  indent <<<"$out" >&2
  code=$(grep -o -m1 'MOB_ERR_[A-Z0-9_]*' <<<"$out" | head -n1 || true)
  fail "${code:-MOB_ERR_NOT_REGISTERED}" 11 "registration with $SERVER failed: $(grep -m1 -E 'MOB_ERR|[Ee]rror' <<<"$out" || tail -n1 <<<"$out")"
}

step_unit() {
  mkdirs etc/systemd/system dir 0755
  local tmp="$UNIT.tmp.$$"
  sed -e "s|@NODE@|$NODE|g" -e "s|@APP@|$APP|g" -e "s|@CONFIG@|$CONF|g" -e "s|@STATE@|$STATE|g" \
    "$APP/mobility-agent.service.in" >"$tmp"
  chmod 0644 "$tmp"
  mv -f "$tmp" "$UNIT"
  record file etc/systemd/system/mobility-agent.service
  # Also with --no-start, so that a later `systemctl start` sees this version.
  if [ "$SYSTEMD" = 1 ]; then systemctl daemon-reload; fi
}

step_manifest() { record file var/lib/mobility/install-manifest; }

step_start_systemd() {
  systemctl enable mobility-agent >/dev/null 2>&1 || fail MOB_ERR_PUSH_INSTALL_FAILED 12 "systemctl enable mobility-agent failed"
  systemctl restart mobility-agent || fail MOB_ERR_PUSH_INSTALL_FAILED 12 "systemctl restart mobility-agent failed: $(journal_tail)"
  # Type=simple has no readiness signal: an agent that dies at once is caught here.
  sleep 2
  systemctl is-active --quiet mobility-agent || fail MOB_ERR_PUSH_INSTALL_FAILED 12 "mobility-agent is not running after start: $(journal_tail)"
}

step_start_detached() {
  stop_agent   # normally already stopped; covers an agent started since the plan
  rm -f "$PIDFILE"
  local log="$LOGDIR/agent.out" child i
  local start_line
  start_line=$(( $( [ -f "$log" ] && wc -l <"$log" || echo 0) + 1 ))
  # 9<&-: the agent must not inherit (and hold) the prefix lock.
  setsid "$NODE" "$APP/dist/src/cli/main.js" agent --config "$CONF" --pid-file "$PIDFILE" >>"$log" 2>&1 </dev/null 9<&- &
  child=$!
  for ((i = 0; i < 100; i++)); do
    if [ -s "$PIDFILE" ]; then break; fi
    if ! running "$child"; then
      wait "$child" 2>/dev/null || true
      fail MOB_ERR_PUSH_INSTALL_FAILED 12 "the agent exited at start: $(tail -n +"$start_line" "$log" | tail -n 5 | tr '\n' ' ')"
    fi
    sleep 0.1
  done
  [ -s "$PIDFILE" ] || fail MOB_ERR_PUSH_INSTALL_FAILED 12 "the agent did not write $PIDFILE within 10 s: $(tail -n +"$start_line" "$log" | tail -n 5 | tr '\n' ' ')"
}

# --- helpers -------------------------------------------------------------------------

indent() { sed 's/^/      /'; }

journal_tail() { journalctl -u mobility-agent -n 5 --no-pager 2>/dev/null | tr '\n' ' ' || true; }

# running PID: the process exists and is not a zombie (a detached agent is
# reaped by init, which some containers' init does late or never).
running() {
  local st
  kill -0 "$1" 2>/dev/null || return 1
  st=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  st=${st##*) }
  [ "${st:0:1}" != Z ]
}

# pid_alive: true when PIDFILE names a live agent (its command line names the
# config or "mobility", so a recycled pid of another program is not signalled).
pid_alive() {
  local pid cmd
  [ -f "$PIDFILE" ] || return 1
  pid=$(tr -cd '0-9' <"$PIDFILE")
  [ -n "$pid" ] && running "$pid" || return 1
  cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
  [[ "$cmd" == *"$CONF"* || "$cmd" == *mobility* ]] || return 1
  AGENT_PID=$pid
}

# stop_agent: stops a running agent (systemd unit, else the pid file), waiting
# up to 60 s for it to drain. Idempotent.
stop_agent() {
  if [ "$SYSTEMD" = 1 ] && systemctl is-active --quiet mobility-agent 2>/dev/null; then
    systemctl stop mobility-agent
  fi
  if pid_alive; then
    kill -TERM "$AGENT_PID" 2>/dev/null || true
    local i
    for ((i = 0; i < 600; i++)); do running "$AGENT_PID" || break; sleep 0.1; done
    if running "$AGENT_PID"; then
      echo "      the agent (pid $AGENT_PID) did not exit within 60 s of SIGTERM: killing it" >&2
      kill -KILL "$AGENT_PID" 2>/dev/null || true
    fi
    rm -f "$PIDFILE"
  fi
}

# --- manifest ------------------------------------------------------------------------
# One entry per line, "<type> <path relative to PREFIX>": dir (created by
# install.sh, removed by uninstall.sh only if empty), tree (a product directory,
# removed with its contents), file, link. Entries of earlier runs are kept.

CREATED=()

record() { CREATED+=("$1 $2"); }

# mkdirs REL TYPE MODE: creates PREFIX/REL and its missing parents, recording
# each directory it creates (the last one as TYPE); chmods REL to MODE.
mkdirs() {
  local rel=$1 type=$2 mode=$3 acc='' part
  [ -d "$PREFIX" ] || mkdir -p "$PREFIX"
  local IFS=/
  for part in $rel; do
    acc=${acc:+$acc/}$part
    if [ ! -d "$P/$acc" ]; then
      mkdir -m 0755 "$P/$acc"
      if [ "$acc" = "$rel" ]; then record "$type" "$acc"; else record dir "$acc"; fi
    fi
  done
  chmod "$mode" "$P/$rel"
}

flush_manifest() {
  [ -d "$STATE" ] || return 0
  [ "${#CREATED[@]}" -gt 0 ] || [ -f "$MANIFEST" ] || return 0
  local tmp="$MANIFEST.tmp.$$"
  { [ ! -f "$MANIFEST" ] || cat "$MANIFEST"
    [ "${#CREATED[@]}" -eq 0 ] || printf '%s\n' "${CREATED[@]}"
  } | LC_ALL=C sort -u -k2,2 -k1,1 >"$tmp"
  chmod 0600 "$tmp"
  mv -f "$tmp" "$MANIFEST"
}

summary() {
  local reg svc
  if [ "$NO_REGISTER" = 1 ]; then reg="not registered (--no-register)"
  elif [ "$REGISTERED" = 1 ]; then reg="already registered with $SERVER"
  else reg="registered with $SERVER"; fi
  if [ "$NO_START" = 1 ]; then svc="not started (--no-start)"
  elif [ "$SYSTEMD" = 1 ]; then svc="running under systemd (systemctl status mobility-agent)"
  else svc="running detached, pid $(cat "$PIDFILE" 2>/dev/null || echo '?') (no systemd: not started at boot)"; fi
  cat <<EOF
Mobility agent $VERSION installed
  app:      $APP
  config:   $CONF
  state:    $STATE
  logs:     $LOGDIR
  unit:     $UNIT
  cli:      $LINK
  node:     $NODE v$NODE_VER
  agent:    $reg
  service:  $svc
  uninstall: $APP/uninstall.sh
EOF
}

# On one line: bash has read it all before main runs, so replacing this file
# (an upgrade run from opt/mobility itself) cannot change what executes.
main "$@"; exit 0
