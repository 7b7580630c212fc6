#!/usr/bin/env bash
# Builds this plugin into a WebAssembly component with the standard go command:
#   ./build.sh [OUT.wasm]     (default: build/go-dir.wasm)
# It needs Go >= 1.25 and wasm-tools (1.263.0 tested) on PATH or in
# $GOCP_TEST_TOOLS/bin (`cargo install wasm-tools`, a release binary, or
# `bash .ci/tools/wasm-tools.sh` in the gocp repository). It writes only
# OUT.wasm, and Go's own caches.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/build/go-dir.wasm}"
# The contract and the SDK: copies next to this script (made by
# examples/new-plugin.sh), else the gocp repository's own (built in place).
wit="$here/gocp-wit"
[ -d "$wit" ] || wit="$here/../../wit"
sdk="$here/gocp-sdk"
[ -d "$sdk" ] || sdk="$here/../../sdk/go"
tools="${GOCP_TEST_TOOLS:-$HOME/.cache/gocp-test-tools}/bin"
wasm_tools="$(command -v wasm-tools || true)"
[ -x "$tools/wasm-tools" ] && wasm_tools="$tools/wasm-tools"
[ -n "$wasm_tools" ] || { echo "build.sh: wasm-tools is not installed: cargo install wasm-tools" >&2; exit 1; }
command -v go >/dev/null || { echo "build.sh: the go command (>= 1.25) is not on PATH" >&2; exit 1; }

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$(dirname "$out")"
cd "$here"
# A reactor (c-shared): the host calls its exports, main never runs.
# -checklinkname=0: the component model's runtime support
# (go.bytecodealliance.org/pkg) allocates through runtime.sbrk before the Go
# runtime is up, by a linkname the linker refuses by default. -s -w: no
# symbol table or DWARF, a third of the size.
GOOS=wasip1 GOARCH=wasm go build -buildmode=c-shared -trimpath -buildvcs=false \
  -ldflags="-checklinkname=0 -s -w" -o "$tmp/core.wasm" .
# The core module becomes a component: the WIT world it implements goes in,
# and wasmtime's preview-1 adapter (of the host's wasmtime version, kept in the
# SDK) turns the Go runtime's WASI preview-1 imports into WASI 0.2 ones.
"$wasm_tools" component embed --world gocp:cache/plugin "$wit" "$tmp/core.wasm" -o "$tmp/embedded.wasm"
"$wasm_tools" component new "$tmp/embedded.wasm" \
  --adapt "wasi_snapshot_preview1=$sdk/adapter/wasi_snapshot_preview1.reactor.wasm" -o "$out"
echo "$out"
