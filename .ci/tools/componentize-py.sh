#!/usr/bin/env bash
# Installs componentize-py (PyPI), which builds the Python example plugin
# (examples/python-dir) into a component: a venv under $GOCP_TEST_TOOLS and a
# wrapper in $GOCP_TEST_TOOLS/bin. Never touches the system Python.
set -euo pipefail
VERSION=0.25.1
TOOLS="${GOCP_TEST_TOOLS:-$HOME/.cache/gocp-test-tools}"
VENV="$TOOLS/componentize-py-$VERSION"
BIN="$TOOLS/bin/componentize-py"

if [ -x "$BIN" ] && "$BIN" --version 2>/dev/null | grep -q "$VERSION"; then
  exit 0
fi
command -v python3 >/dev/null || { echo "componentize-py.sh: python3 is missing (apt-get install python3 python3-venv)" >&2; exit 1; }
rm -rf "$VENV"
# Quiet on success; everything on failure.
if ! log=$(python3 -m venv "$VENV" 2>&1 &&
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "componentize-py==$VERSION" 2>&1); then
  printf '%s\n' "$log" >&2
  echo "componentize-py.sh: installing componentize-py $VERSION from PyPI failed" >&2
  exit 1
fi
mkdir -p "$TOOLS/bin"
# A wrapper rather than a symlink, so the venv's interpreter is always the one used.
printf '#!/bin/sh\nexec "%s" "$@"\n' "$VENV/bin/componentize-py" >"$BIN"
chmod +x "$BIN"
"$BIN" --version >/dev/null
