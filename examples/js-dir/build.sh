#!/usr/bin/env bash
# Builds this plugin into a WebAssembly component with componentize-js:
#   ./build.sh [OUT.wasm]     (default: build/js-dir.wasm)
# It needs componentize-js 0.23.0 on PATH or in $GOCP_TEST_TOOLS/bin
# (`npm install @bytecodealliance/componentize-js@0.23.0`, or
# `bash .ci/tools/jco.sh` in the gocp repository). It writes only OUT.wasm.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/build/js-dir.wasm}"
# The contract: a copy of gocp's wit/ next to this script, else the gocp
# repository's own (when built in place, in examples/).
gocp_wit="$here/gocp-wit"
[ -d "$gocp_wit" ] || gocp_wit="$here/../../wit"
tools="${GOCP_TEST_TOOLS:-$HOME/.cache/gocp-test-tools}/bin"
cjs="$(command -v componentize-js || true)"
[ -x "$tools/componentize-js" ] && cjs="$tools/componentize-js"
[ -n "$cjs" ] || { echo "build.sh: componentize-js is not installed: npm install @bytecodealliance/componentize-js@0.23.0" >&2; exit 1; }

# One WIT directory with this example's world and every package it uses.
wit="$(mktemp -d)"
trap 'rm -rf "$wit"' EXIT
cp -R "$here/wit/." "$wit/"
mkdir -p "$wit/deps/gocp"
cp "$gocp_wit/gocp.wit" "$wit/deps/gocp/"
cp -R "$gocp_wit/deps/." "$wit/deps/"

mkdir -p "$(dirname "$out")"
"$cjs" "$here/plugin.js" --wit "$wit" --world-name plugin --out "$out" >/dev/null
echo "$out"
