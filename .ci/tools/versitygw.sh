#!/usr/bin/env bash
# Installs versitygw, an S3-compatible gateway people run in production, for the
# s3 plugin's tests (tests/remote_s3.rs): built from the Go module proxy at a
# pinned version into $GOCP_TEST_TOOLS/bin. Never starts it: tests do.
set -euo pipefail
VERSION=v1.8.0
TOOLS="${GOCP_TEST_TOOLS:-$HOME/.cache/gocp-test-tools}"
BIN="$TOOLS/bin/versitygw"
STAMP="$TOOLS/versitygw.version"
if [ -x "$BIN" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$VERSION" ]; then
  exit 0
fi
mkdir -p "$TOOLS/bin"
# Its own module cache, so a user's GOFLAGS or GOPATH settings do not matter;
# CGO off gives a static binary and needs no C compiler.
GOBIN="$TOOLS/bin" GOFLAGS=-modcacherw GOTOOLCHAIN=local CGO_ENABLED=0 GOPROXY=https://proxy.golang.org \
  go install "github.com/versity/versitygw/cmd/versitygw@$VERSION" 2>&1 | grep -v '^go: downloading' >&2 || true
[ -x "$BIN" ] || { echo "versitygw.sh: go install github.com/versity/versitygw/cmd/versitygw@$VERSION failed" >&2; exit 1; }
echo "$VERSION" > "$STAMP"
