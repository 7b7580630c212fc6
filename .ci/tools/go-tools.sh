#!/usr/bin/env bash
# Installs the Go tools the compatibility suite (tests/compat.rs) runs through
# gocp: staticcheck, golangci-lint v2 and gopls, each built with `go install`
# from the Go module proxy at a pinned version into $GOCP_TEST_TOOLS/bin.
# The pins are the newest releases that build with Go 1.26 (gopls v0.24 wants 1.27).
set -euo pipefail
TOOLS="${GOCP_TEST_TOOLS:-$HOME/.cache/gocp-test-tools}"
# package, module version, executable
PINNED=(
  "honnef.co/go/tools/cmd/staticcheck v0.8.2 staticcheck"
  "github.com/golangci/golangci-lint/v2/cmd/golangci-lint v2.15.0 golangci-lint"
  "golang.org/x/tools/gopls v0.23.0 gopls"
)
mkdir -p "$TOOLS/bin"
for line in "${PINNED[@]}"; do
  read -r pkg version exe <<<"$line"
  bin="$TOOLS/bin/$exe"
  # The executable records the version it was built from: nothing else to keep in step.
  if [ -x "$bin" ] && [ "$(go version -m "$bin" 2>/dev/null | awk '$1 == "mod" { print $3 }')" = "$version" ]; then
    continue
  fi
  # The suite's own GOPATH (its module cache is shared with the tests); the go
  # on PATH, or the toolchain a tool asks for when that go is older; no cgo
  # (static binaries, no C compiler needed).
  if ! log=$(GOBIN="$TOOLS/bin" GOPATH="$TOOLS/go" GOFLAGS=-modcacherw GOTOOLCHAIN=auto CGO_ENABLED=0 \
    GOPROXY=https://proxy.golang.org go install "$pkg@$version" 2>&1); then
    printf '%s\n' "$log" >&2
    echo "go-tools.sh: go install $pkg@$version failed" >&2
    exit 1
  fi
done
