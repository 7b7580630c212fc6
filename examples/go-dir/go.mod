// go-dir, a gocp plugin in Go: the module build.sh builds into a component.
module gocp-example/go-dir

go 1.25

require gocp/plugin v0.0.0

require go.bytecodealliance.org/pkg v0.2.3 // indirect

// The SDK: gocp's sdk/go, or in a plugin started with examples/new-plugin.sh,
// the copy of it in gocp-sdk/.
replace gocp/plugin => ../../sdk/go
