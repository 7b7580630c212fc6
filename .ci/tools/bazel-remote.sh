#!/usr/bin/env bash
# Installs bazel-remote, the Bazel remote cache server many teams run, for the
# http plugin's tests (tests/remote_bazel.rs) into $GOCP_TEST_TOOLS/bin. The
# Go module proxy refuses its module, so it is built from the unmodified
# source kept beside this repository in ../shared/peers (SOURCES.md there names
# the commit), by that directory's own build.sh. Never starts it: tests do.
set -euo pipefail
TOOLS="${GOCP_TEST_TOOLS:-$HOME/.cache/gocp-test-tools}"
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PEERS="$REPO/../shared/peers"
TARBALL="$PEERS/buchgr+bazel-remote.tar.gz"
BIN="$TOOLS/bin/bazel-remote"
STAMP="$TOOLS/bazel-remote.source"

if [ ! -f "$TARBALL" ] || [ ! -f "$PEERS/build.sh" ]; then
  echo "bazel-remote.sh: no bazel-remote source at $TARBALL (with build.sh beside it): the Go module proxy does not serve bazel-remote, so it is built from that tarball; put the peers directory there" >&2
  exit 1
fi
# The tarball's hash is the version: a new one is built again.
source_sum=$(sha256sum "$TARBALL" | cut -d' ' -f1)
if [ -x "$BIN" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$source_sum" ]; then
  exit 0
fi
mkdir -p "$TOOLS/bin"
work="$TOOLS/bazel-remote-build"
rm -rf "$work"
# build.sh keeps a binary that exists, so it builds into a fresh directory;
# the suite's own module cache keeps a user's GOPATH out of it.
if ! log=$(GOPATH="$TOOLS/go" GOPROXY=https://proxy.golang.org bash "$PEERS/build.sh" "$work" bazel-remote 2>&1); then
  printf '%s\n' "$log" >&2
  echo "bazel-remote.sh: building bazel-remote from $TARBALL failed" >&2
  exit 1
fi
install -m 0755 "$work/bin/bazel-remote" "$BIN"
rm -rf "$work"
echo "$source_sum" >"$STAMP"
