// Package plugin is the Go SDK for gocp cache backend plugins: it owns the
// bridge between gocp's WIT contract (wit/gocp.wit) and a plain Go interface.
//
// Implement [Backend], hand it to [Export] from an init function, and build
// the package with GOOS=wasip1 GOARCH=wasm -buildmode=c-shared (see
// examples/go-dir/build.sh, which also turns the module into a component).
// The WIT file's comments are the reference for what each call must do; this
// package adds no policy of its own beyond rejecting configuration keys that
// Describe does not list.
//
// What the package hides, so that no plugin needs to know: the generated
// bindings and the canonical ABI, dropping the host's borrowed stream handles
// before a call returns, and keeping Go's garbage collector out of the
// allocations the host makes inside the plugin (it reads the clock there,
// which the component model forbids, and the instance would trap): the
// collector runs only between and inside calls, at points the SDK chooses.
package plugin

import "io"

// Info says what the plugin is (see `info` in the WIT file). It must not
// depend on configuration.
type Info struct {
	// Short name, used in messages and statistics, e.g. "disk".
	Name string
	// The plugin's own version, e.g. "1.2.0".
	Version string
	// One line for humans.
	Summary string
	// How many instances may run at once: 1 when the data lives in the
	// instance's memory, 0 (no limit) when every instance works on shared
	// outside state such as files or a server.
	MaxInstances uint32
	// Every key Open accepts; any other key is rejected before Open runs.
	ConfigKeys []ConfigKey
}

// ConfigKey is one configuration key, for `gocp-host --help-plugin`.
type ConfigKey struct {
	Name string
	// One line: what the key does and its default.
	Help string
}

// Capabilities is what Open found out about this configuration.
type Capabilities struct {
	// Whether the plugin keeps bodies and wants WriteBody calls; false only
	// when its storage is the very disk the host already keeps bodies on.
	StoresBodies bool
}

// Backend is a cache backend. The host makes one instance of the component
// per concurrent worker; each instance holds one Backend value, and calls into
// one instance never overlap, so a Backend needs no locking.
type Backend interface {
	// Describe says what the plugin is; it may be called before Open.
	Describe() Info

	// Open prepares the backend from the user's --config pairs. Keys not
	// listed in Describe's ConfigKeys have already been rejected; check the
	// values here and return an InvalidConfig error saying what to change.
	Open(config *Config) (Capabilities, error)

	// ReadEntry returns the entry stored for actionID, or ErrNotFound. Its
	// HostData must be the bytes WriteEntry was given, unchanged.
	ReadEntry(actionID Digest) (Entry, error)

	// WriteEntry stores (or replaces) the entry for actionID, HostData
	// included.
	WriteEntry(actionID Digest, entry Entry) error

	// ReadBody writes the body of outputID (size bytes) to sink, or returns
	// ErrNotFound. Only called when Open said StoresBodies.
	ReadBody(outputID Digest, size uint64, sink io.Writer) error

	// WriteBody stores the size bytes read from body, which hash to
	// outputID. Only called when Open said StoresBodies, and before the
	// WriteEntry that refers to it. Bodies never change: a body already
	// stored under outputID need not be read again.
	WriteBody(outputID Digest, size uint64, body io.Reader) error

	// Finish is called once when the host is about to exit, with a time
	// limit: finish buffered writes and do housekeeping.
	Finish() error
}

var exported Backend

// Export makes b the plugin's backend. Call it exactly once, from an init
// function of the plugin's main package: the host may call Describe as soon
// as the component is instantiated.
func Export(b Backend) {
	if exported != nil {
		panic("plugin.Export called twice")
	}
	exported = b
}
