#!/usr/bin/env bash
# Installs the Redis server the redis plugin's tests start (tests/support/servers/redis.rs):
# Debian's redis-tools, pinned to Redis 7.0, linked into $GOCP_TEST_TOOLS/bin as redis-server
# and redis-cli. It must never start a server.
#
# Why redis-tools and not redis-server: Debian's /usr/bin/redis-server is only a symlink to
# redis-tools' redis-check-rdb (the one Redis binary picks its role from its name), and the
# redis-server package adds a system service that a machine with systemd would start on 6379.
set -euo pipefail

VERSION='5:7.0.*'   # Debian 12's Redis 7.0 line (security updates keep the same line)
BIN="${GOCP_TEST_TOOLS:-$HOME/.cache/gocp-test-tools}/bin"
mkdir -p "$BIN"

if [ -x "$BIN/redis-server" ] && "$BIN/redis-server" --version 2>/dev/null | grep -q 'v=7\.0\.'; then
  exit 0
fi

if ! dpkg-query -W -f='${Version}' redis-tools 2>/dev/null | grep -q '^5:7\.0\.'; then
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -qq --no-install-recommends "redis-tools=$VERSION" >/dev/null 2>&1; then
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "redis-tools=$VERSION" >/dev/null
  fi
fi

ln -sf /usr/bin/redis-check-rdb "$BIN/redis-server"
ln -sf /usr/bin/redis-cli "$BIN/redis-cli"
"$BIN/redis-server" --version | grep -q 'v=7\.0\.' || { echo "redis.sh: $BIN/redis-server is not Redis 7.0" >&2; exit 1; }
