#!/usr/bin/env bash
# Installs jco and componentize-js (npm), which build the JavaScript example
# plugin (examples/js-dir) into a component: a private npm prefix under
# $GOCP_TEST_TOOLS and wrappers in $GOCP_TEST_TOOLS/bin. Never installs globally.
set -euo pipefail
JCO_VERSION=1.35.0
CJS_VERSION=0.23.0
TOOLS="${GOCP_TEST_TOOLS:-$HOME/.cache/gocp-test-tools}"
DIR="$TOOLS/jco-$JCO_VERSION-componentize-js-$CJS_VERSION"
STAMP="$DIR/.installed"

if [ -f "$STAMP" ] && [ -x "$TOOLS/bin/jco" ] && [ -x "$TOOLS/bin/componentize-js" ]; then
  exit 0
fi
command -v npm >/dev/null || { echo "jco.sh: node and npm are missing (apt-get install nodejs npm)" >&2; exit 1; }
rm -rf "$DIR"
mkdir -p "$DIR" "$TOOLS/bin"
# Exact versions: jco brings its own componentize-js (^0.22) for `jco
# componentize`; the example is built with componentize-js's own CLI at
# the pinned version instead.
# Quiet on success (npm warns about user configuration it does not know);
# everything on failure.
if ! log=$(cd "$DIR" && npm init -y 2>&1 &&
  npm install --no-audit --no-fund --save-exact \
    "@bytecodealliance/jco@$JCO_VERSION" "@bytecodealliance/componentize-js@$CJS_VERSION" 2>&1); then
  printf '%s\n' "$log" >&2
  echo "jco.sh: installing jco $JCO_VERSION and componentize-js $CJS_VERSION from npm failed" >&2
  exit 1
fi
for tool in jco componentize-js; do
  printf '#!/bin/sh\nexec "%s" "$@"\n' "$DIR/node_modules/.bin/$tool" >"$TOOLS/bin/$tool"
  chmod +x "$TOOLS/bin/$tool"
done
touch "$STAMP"
