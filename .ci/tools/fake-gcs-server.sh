#!/usr/bin/env bash
# Installs fake-gcs-server, the Google Cloud Storage emulator that GCS client
# libraries are tested with, for the gcs plugin's tests (tests/remote_gcs.rs):
# built with `go install` from the Go module proxy at a pinned version into
# $GOCP_TEST_TOOLS/bin. It needs Go >= 1.25. Never starts it: tests do.
set -euo pipefail
VERSION=v1.54.0
TOOLS="${GOCP_TEST_TOOLS:-$HOME/.cache/gocp-test-tools}"
BIN="$TOOLS/bin/fake-gcs-server"
# The executable records the version it was built from.
if [ -x "$BIN" ] && [ "$(go version -m "$BIN" 2>/dev/null | awk '$1 == "mod" { print $3 }')" = "$VERSION" ]; then
  exit 0
fi
mkdir -p "$TOOLS/bin"
# The suite's own GOPATH, the go on PATH, no cgo (a static binary, no C compiler).
if ! log=$(GOBIN="$TOOLS/bin" GOPATH="$TOOLS/go" GOFLAGS=-modcacherw GOTOOLCHAIN=local CGO_ENABLED=0 \
  GOPROXY=https://proxy.golang.org go install "github.com/fsouza/fake-gcs-server@$VERSION" 2>&1); then
  printf '%s\n' "$log" >&2
  echo "fake-gcs-server.sh: go install github.com/fsouza/fake-gcs-server@$VERSION failed (it needs Go >= 1.25)" >&2
  exit 1
fi
