// The Go SDK for gocp plugins: package gocp/plugin and its generated
// bindings. Go 1.25, because go.bytecodealliance.org/pkg (the runtime support
// the generated code needs) declares it.
module gocp/plugin

go 1.25

require go.bytecodealliance.org/pkg v0.2.3
