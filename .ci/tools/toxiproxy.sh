#!/usr/bin/env bash
# Installs toxiproxy (Shopify), the TCP proxy that adds latency and bandwidth
# limits to a connection, for the benchmark's remote part (bench/src/link.rs:
# every remote server sits behind a toxiproxy proxy that emulates a LAN or WAN
# link): its server and its CLI, built with `go install` from the Go module
# proxy at a pinned version into $GOCP_TEST_TOOLS/bin as toxiproxy-server and
# toxiproxy-cli. Never starts it: the benchmark does.
set -euo pipefail
VERSION=v2.5.0
TOOLS="${GOCP_TEST_TOOLS:-$HOME/.cache/gocp-test-tools}"
# package, executable `go install` makes, name in bin/
PINNED=(
  "github.com/Shopify/toxiproxy/v2/cmd/server server toxiproxy-server"
  "github.com/Shopify/toxiproxy/v2/cmd/cli cli toxiproxy-cli"
)
mkdir -p "$TOOLS/bin"
for line in "${PINNED[@]}"; do
  read -r pkg built exe <<<"$line"
  bin="$TOOLS/bin/$exe"
  # The executable records the version it was built from.
  if [ -x "$bin" ] && [ "$(go version -m "$bin" 2>/dev/null | awk '$1 == "mod" { print $3 }')" = "$VERSION" ]; then
    continue
  fi
  # `go install` names the executable after the package's directory (server,
  # cli): build into a directory of its own, then give it its real name. The
  # suite's own GOPATH, the go on PATH, no cgo (a static binary).
  work=$(mktemp -d)
  if ! log=$(GOBIN="$work" GOPATH="$TOOLS/go" GOFLAGS=-modcacherw GOTOOLCHAIN=local CGO_ENABLED=0 \
    GOPROXY=https://proxy.golang.org go install "$pkg@$VERSION" 2>&1); then
    printf '%s\n' "$log" >&2
    rm -rf "$work"
    echo "toxiproxy.sh: go install $pkg@$VERSION failed" >&2
    exit 1
  fi
  install -m 0755 "$work/$built" "$bin"
  rm -rf "$work"
done
