#!/usr/bin/env bash
# Builds this plugin into a WebAssembly component with componentize-py:
#   ./build.sh [OUT.wasm]     (default: build/python-dir.wasm)
# It needs componentize-py 0.25.1 on PATH or in $GOCP_TEST_TOOLS/bin
# (`pip install componentize-py==0.25.1`, or `bash .ci/tools/componentize-py.sh`
# in the gocp repository). It writes only OUT.wasm.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/build/python-dir.wasm}"
# The contract: a copy of gocp's wit/ next to this script, else the gocp
# repository's own (when built in place, in examples/).
wit="$here/gocp-wit"
[ -d "$wit" ] || wit="$here/../../wit"
tools="${GOCP_TEST_TOOLS:-$HOME/.cache/gocp-test-tools}/bin"
cpy="$(command -v componentize-py || true)"
[ -x "$tools/componentize-py" ] && cpy="$tools/componentize-py"
[ -n "$cpy" ] || { echo "build.sh: componentize-py is not installed: pip install componentize-py==0.25.1" >&2; exit 1; }
mkdir -p "$(dirname "$out")"
cd "$here"
"$cpy" --wit-path "$wit" --world gocp:cache/plugin componentize --python-path "$here" app --output "$out" >/dev/null
echo "$out"
