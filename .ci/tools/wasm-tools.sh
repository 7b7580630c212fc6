#!/usr/bin/env bash
# Installs wasm-tools (crates.io), which turns the Go example plugin
# (examples/go-dir) into a component: `component embed` and `component new`.
# Built once from source with only its `component` feature (one and a half to
# three minutes on two cores) under $GOCP_TEST_TOOLS, with a wrapper in
# $GOCP_TEST_TOOLS/bin; nothing goes into ~/.cargo/bin.
set -euo pipefail
VERSION=1.263.0
TOOLS="${GOCP_TEST_TOOLS:-$HOME/.cache/gocp-test-tools}"
DIR="$TOOLS/wasm-tools-$VERSION"
BIN="$TOOLS/bin/wasm-tools"

if [ -x "$BIN" ] && "$BIN" --version 2>/dev/null | grep -qx "wasm-tools $VERSION"; then
  exit 0
fi
command -v cargo >/dev/null || { echo "wasm-tools.sh: cargo is missing (install Rust with rustup)" >&2; exit 1; }
rm -rf "$DIR"
# Quiet on success; everything on failure. The host's RUSTFLAGS, if any, are
# not meant for this build.
if ! log=$(env -u RUSTFLAGS -u CARGO_ENCODED_RUSTFLAGS CARGO_TARGET_DIR="$DIR/target" \
  cargo install --quiet --locked --root "$DIR" --version "$VERSION" \
  --no-default-features --features component wasm-tools 2>&1); then
  printf '%s\n' "$log" >&2
  echo "wasm-tools.sh: building wasm-tools $VERSION from crates.io failed" >&2
  exit 1
fi
rm -rf "$DIR/target"
mkdir -p "$TOOLS/bin"
printf '#!/bin/sh\nexec "%s" "$@"\n' "$DIR/bin/wasm-tools" >"$BIN"
chmod +x "$BIN"
"$BIN" --version >/dev/null
