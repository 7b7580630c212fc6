#!/usr/bin/env bash
# Regenerates what the Go SDK does not write by hand, in one command:
#   sdk/go/regenerate.sh
# - internal/wit/: Go bindings of gocp's contract (../../wit, world
#   gocp:cache/plugin) from wit-bindgen's Go generator, with the fixes the
#   generated code needs applied;
# - adapter/: wasmtime's preview-1 reactor adapter, of the wasmtime version the
#   host pins (host/Cargo.toml), so components built here match the host.
# For maintainers, after wit/ or the host's wasmtime changes; plugin builds
# never run it (everything it writes is committed). It needs
#   cargo install wit-bindgen-cli --version 0.62.0 --no-default-features --features go --locked
# and cargo (to fetch the adapter's crate). It writes nothing outside sdk/go.
set -euo pipefail
WIT_BINDGEN_VERSION=0.62.0
here="$(cd "$(dirname "$0")" && pwd)"
root="$here/../.."
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

command -v wit-bindgen >/dev/null && wit-bindgen --version | grep -qx "wit-bindgen-cli $WIT_BINDGEN_VERSION" || {
  echo "regenerate.sh: needs wit-bindgen-cli $WIT_BINDGEN_VERSION:" >&2
  echo "  cargo install wit-bindgen-cli --version $WIT_BINDGEN_VERSION --no-default-features --features go --locked" >&2
  exit 1
}

# The runtime module the generated code imports must be the one go.mod pins.
wanted="$(wit-bindgen go --pkg-name gocp/plugin/internal/wit --print-remote-pkg-version --out-dir "$tmp/probe" "$root/wit" 2>/dev/null | sed -n 's/^go.bytecodealliance.org\/pkg //p')"
pinned="$(sed -n 's/^require go.bytecodealliance.org\/pkg \(v[0-9.]*\)$/\1/p' "$here/go.mod")"
[ "$wanted" = "$pinned" ] || {
  echo "regenerate.sh: wit-bindgen $WIT_BINDGEN_VERSION wants go.bytecodealliance.org/pkg $wanted, go.mod pins '$pinned'" >&2
  exit 1
}

# Quiet on success (it names every file it writes); everything on failure.
if ! log=$(wit-bindgen go --world gocp:cache/plugin --pkg-name gocp/plugin/internal/wit --out-dir "$tmp/gen" "$root/wit" 2>&1); then
  printf '%s\n' "$log" >&2
  exit 1
fi
# Generated packages are replaced whole. export_gocp_cache_backend is not
# generated: it is the SDK's hand-written bridge that the export glue calls.
for dir in "$here"/internal/wit/*/; do
  [ "$(basename "$dir")" = export_gocp_cache_backend ] || rm -rf "$dir"
done
mkdir -p "$here/internal/wit"
cp -R "$tmp/gen/." "$here/internal/wit/"

# Fix: the export glue allocates its shared return area with a size that need
# not be a multiple of its alignment (36 bytes at alignment 8 for
# gocp:cache@0.1.0's world; 0.2.0's 40 happens to be one), which
# go.bytecodealliance.org/pkg refuses with a panic at instantiation: round the
# size up.
exports="$here/internal/wit/wit_exports/wit_exports.go"
sed -i -E 's/^(var exportReturnArea = uintptr\(witRuntime\.Allocate\(&staticPinner, )(.+), ([0-9]+)\)\)$/\1((\2)+\3-1)\/\3*\3, \3))/' "$exports"
grep -q '^var exportReturnArea = .*+[0-9]*-1)/[0-9]*\*[0-9]*, [0-9]*))$' "$exports" || {
  echo "regenerate.sh: the export return area in $exports no longer looks as expected; check the fix by hand" >&2
  exit 1
}
gofmt -w "$here/internal/wit"
# What they were made from: tests/examples.rs fails when wit/ changes and
# this script has not been run since.
{
  echo "wit-bindgen-cli $WIT_BINDGEN_VERSION, world gocp:cache/plugin, from:"
  (cd "$root" && find wit -name '*.wit' | LC_ALL=C sort | xargs sha256sum)
} >"$here/internal/wit/SOURCE"

# The adapter, from the crate that ships it for the host's wasmtime version.
wasmtime="$(sed -n 's/^wasmtime = { version = "=\([0-9.]*\)".*/\1/p' "$root/host/Cargo.toml")"
[ -n "$wasmtime" ] || { echo "regenerate.sh: no exact wasmtime version in host/Cargo.toml" >&2; exit 1; }
crate=wasi-preview1-component-adapter-provider
mkdir -p "$tmp/fetch/src"
printf '[package]\nname = "fetch-adapter"\nversion = "0.0.0"\nedition = "2021"\n\n[dependencies]\n%s = "=%s"\n' \
  "$crate" "$wasmtime" >"$tmp/fetch/Cargo.toml"
: >"$tmp/fetch/src/lib.rs"
(cd "$tmp/fetch" && cargo vendor --quiet --versioned-dirs "$tmp/vendor" >/dev/null)
cp "$tmp/vendor/$crate-$wasmtime/artefacts/wasi_snapshot_preview1.reactor.wasm" "$here/adapter/"
sum="$(sha256sum "$here/adapter/wasi_snapshot_preview1.reactor.wasm" | cut -d' ' -f1)"
printf '%s %s artefacts/wasi_snapshot_preview1.reactor.wasm sha256:%s\n' "$crate" "$wasmtime" "$sum" >"$here/adapter/SOURCE"

echo "regenerated internal/wit (wit-bindgen $WIT_BINDGEN_VERSION) and adapter/ (wasmtime $wasmtime)"
