#!/usr/bin/env bash
# Installs WsgiDAV, a plain WebDAV server (PUT needs the parent collection to
# exist, as with Apache mod_dav), for the http plugin's tests: from PyPI into
# a virtualenv under $GOCP_TEST_TOOLS, with a wrapper in $GOCP_TEST_TOOLS/bin.
# It never starts the server: tests/support/servers/wsgidav.rs does.
set -euo pipefail

WSGIDAV=4.4.0
CHEROOT=11.1.2
TOOLS="${GOCP_TEST_TOOLS:-$HOME/.cache/gocp-test-tools}"
VENV="$TOOLS/wsgidav-$WSGIDAV"

if [ -x "$TOOLS/bin/wsgidav" ] && [ -x "$VENV/bin/wsgidav" ]; then
  exit 0
fi
mkdir -p "$TOOLS/bin"
if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
  apt-get update -qq >/dev/null 2>&1 || true
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null 2>&1
  rm -rf "$VENV"
  python3 -m venv "$VENV"
fi
if ! out=$("$VENV/bin/pip" install -q --disable-pip-version-check "wsgidav==$WSGIDAV" "cheroot==$CHEROOT" 2>&1); then
  printf '%s\n' "$out" >&2
  echo "wsgidav.sh: pip install wsgidav==$WSGIDAV failed" >&2
  exit 1
fi
printf '#!/bin/sh\nexec "%s/bin/wsgidav" "$@"\n' "$VENV" >"$TOOLS/bin/wsgidav"
chmod +x "$TOOLS/bin/wsgidav"
