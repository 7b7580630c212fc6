#!/usr/bin/env bash
# Installs nginx (WebDAV PUT + auth_basic: a Bazel HTTP remote-cache server as
# many teams run it) for the http plugin's tests into $GOCP_TEST_TOOLS/bin.
# The binary is unpacked from Debian's package rather than installed with
# apt-get install, whose maintainer scripts would start a system nginx on port 80.
# It never starts the server: tests/support/servers/nginx.rs does.
set -euo pipefail

# Debian 12's nginx. The security archive keeps only the newest build, so when
# this exact one is gone the script takes the current 1.22.1 build instead.
VERSION=1.22.1-9+deb12u11
UPSTREAM=1.22.1
TOOLS="${GOCP_TEST_TOOLS:-$HOME/.cache/gocp-test-tools}"

if [ -x "$TOOLS/bin/nginx" ] && "$TOOLS/bin/nginx" -v 2>&1 | grep -q "nginx/$UPSTREAM"; then
  exit 0
fi
mkdir -p "$TOOLS/bin"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
download() { apt-get download -qq "$1" >/dev/null 2>&1; }
if ! download "nginx=$VERSION"; then
  apt-get update -qq >/dev/null 2>&1 || true
  download "nginx=$VERSION" || download nginx || { echo "nginx.sh: apt-get download nginx failed" >&2; exit 1; }
fi
dpkg-deb -x nginx_*.deb root
bin="$work/root/usr/sbin/nginx"
"$bin" -v 2>&1 | grep -q "nginx/$UPSTREAM" || { echo "nginx.sh: the package is not nginx $UPSTREAM: $("$bin" -v 2>&1)" >&2; exit 1; }
# Its shared libraries (libssl3, libpcre2-8-0, zlib1g, libcrypt1) are on every Debian 12 machine.
install -m 0755 "$bin" "$TOOLS/bin/nginx"
