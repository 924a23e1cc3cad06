# Sourced by demo.sh and test.sh. install_missing CMD:PACKAGE ...: installs (apt, as root or with
# sudo, no recommends) the package of every command that is not on PATH or in /usr/sbin.
install_missing() {
  local need=() pair SUDO=""
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${pair%%:*}" ] || need+=("${pair#*:}")
  done
  [ ${#need[@]} -gt 0 ] || return 0
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends "${need[@]}"
}
