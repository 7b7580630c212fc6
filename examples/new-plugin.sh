#!/usr/bin/env bash
# Starts a new gocp plugin from one of these examples, in one command:
#   examples/new-plugin.sh python|js|go DIR [NAME]
# It copies the example to DIR (which must not exist yet), names the plugin NAME
# (default: DIR's base name) and puts a copy of gocp's contract (wit/) in
# DIR/gocp-wit (and for Go, of the Go SDK in DIR/gocp-sdk, which DIR's go.mod
# points at), so DIR builds on its own, outside this repository. It writes
# nothing but DIR.
set -euo pipefail
usage() { echo "usage: $0 python|js|go DIR [NAME]   (NAME: lower-case words joined by '-', e.g. blob-store)" >&2; exit 2; }
[ $# -ge 2 ] || usage
here="$(cd "$(dirname "$0")" && pwd)"
case "$1" in
  python) example=python-dir ;;
  js | javascript) example=js-dir ;;
  go) example=go-dir ;;
  *) usage ;;
esac
dir="$2"
name="${3:-$(basename "$dir")}"
# The name ends up in describe(), messages and (for JS) a WIT package name.
[[ "$name" =~ ^[a-z][a-z0-9]*(-[a-z][a-z0-9]*)*$ ]] || { echo "$0: '$name' is not a valid plugin name" >&2; usage; }
[ ! -e "$dir" ] || { echo "$0: $dir already exists: pick a new directory" >&2; exit 1; }

mkdir -p "$dir"
# Sources only: never a previous build or interpreter cache.
(cd "$here/$example" && tar --exclude=build --exclude=__pycache__ -cf - .) | (cd "$dir" && tar -xf -)
mkdir -p "$dir/gocp-wit"
cp -R "$here/../wit/." "$dir/gocp-wit/"
if [ "$example" = go-dir ]; then
  # The SDK as the copy's own module; regenerating it is the repository's job.
  mkdir -p "$dir/gocp-sdk"
  (cd "$here/../sdk/go" && tar --exclude=regenerate.sh -cf - .) | (cd "$dir/gocp-sdk" && tar -xf -)
  sed -i 's#^replace gocp/plugin => ../../sdk/go$#replace gocp/plugin => ./gocp-sdk#' "$dir/go.mod"
  grep -qx 'replace gocp/plugin => ./gocp-sdk' "$dir/go.mod" || { echo "$0: could not point $dir/go.mod at gocp-sdk" >&2; exit 1; }
fi
grep -rlF "$example" "$dir" --exclude-dir=gocp-wit --exclude-dir=gocp-sdk | while read -r file; do
  sed -i "s/$example/$name/g" "$file"
done
echo "Created $dir (plugin $name, from examples/$example). Next:"
echo "  $dir/build.sh && gocp-host plugin-test $dir/build/$name.wasm"
