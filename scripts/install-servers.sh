#!/usr/bin/env bash
# Install the real servers the tests start (slapd, redis-server, nginx) and the load
# generator. With CI=true a server that cannot be installed is a failure.
set -uo pipefail
need=()
command -v slapd >/dev/null 2>&1 || [ -x /usr/sbin/slapd ] || need+=(slapd)
command -v ldapadd >/dev/null 2>&1 || need+=(ldap-utils)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
# The gateway in front of pools (tests/pool/test_gateway.py).
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
[ ${#need[@]} -eq 0 ] && exit 0

echo "install-servers: installing ${need[*]}" >&2
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
if command -v apt-get >/dev/null 2>&1; then
  $SUDO apt-get update -qq -o DPkg::Lock::Timeout=300 >/dev/null 2>&1 || true
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq -o DPkg::Lock::Timeout=300 \
    "${need[@]}" >/dev/null && exit 0
fi
if [ "${CI:-}" = "true" ]; then
  echo "install-servers: could not install ${need[*]} and CI=true: failing" >&2
  exit 1
fi
echo "install-servers: could not install ${need[*]}; tests needing them will be skipped" >&2
exit 0
