#!/usr/bin/env bash
# Installs Azurite, Microsoft's Azure Storage emulator, for the azure plugin's
# tests (tests/remote_azure.rs): from npm at a pinned version into a private
# prefix under $GOCP_TEST_TOOLS, with a wrapper for its blob service in
# $GOCP_TEST_TOOLS/bin. Never installs globally, never starts it: tests do.
set -euo pipefail
# 3.35.0 runs on Node >= 10; 3.37.0 wants Node >= 22, newer than Debian 12's.
VERSION=3.35.0
TOOLS="${GOCP_TEST_TOOLS:-$HOME/.cache/gocp-test-tools}"
DIR="$TOOLS/azurite-$VERSION"
STAMP="$DIR/.installed"

if [ -f "$STAMP" ] && [ -x "$TOOLS/bin/azurite-blob" ]; then
  exit 0
fi
command -v npm >/dev/null || { echo "azurite.sh: node and npm are missing (apt-get install nodejs npm)" >&2; exit 1; }
rm -rf "$DIR"
mkdir -p "$DIR" "$TOOLS/bin"
# Quiet on success; everything on failure.
if ! log=$(cd "$DIR" && npm init -y 2>&1 && npm install --no-audit --no-fund --save-exact "azurite@$VERSION" 2>&1); then
  printf '%s\n' "$log" >&2
  echo "azurite.sh: installing azurite $VERSION from npm failed" >&2
  exit 1
fi
printf '#!/bin/sh\nexec "%s" "$@"\n' "$DIR/node_modules/.bin/azurite-blob" >"$TOOLS/bin/azurite-blob"
chmod +x "$TOOLS/bin/azurite-blob"
touch "$STAMP"
