// What happens to each call between the contract and the exported Backend,
// in plain Go types: checks the host's arguments, rejects undeclared
// configuration keys, and refuses calls before a successful Open. The wasip1
// layer (export_wasip1.go) only converts to and from the WIT types around it.

package plugin

import (
	"io"
	"strings"
)

// opened is set by the first successful Open of this instance.
var opened bool

// backend is the exported Backend; a plugin that never called Export has
// nothing to answer with, and says so on stderr (shown with --verbose).
func backend() Backend {
	if exported == nil {
		panic("gocp plugin: no Backend: call plugin.Export from an init function of the main package")
	}
	return exported
}

func callDescribe() Info {
	return backend().Describe()
}

func callOpen(pairs [][2]string) (Capabilities, error) {
	info := backend().Describe()
	known := map[string]bool{}
	names := make([]string, 0, len(info.ConfigKeys))
	for _, k := range info.ConfigKeys {
		known[k.Name] = true
		names = append(names, k.Name)
	}
	var unknown []string
	for _, p := range pairs {
		if !known[p[0]] {
			unknown = append(unknown, p[0])
			// Named once, however often it was given.
			known[p[0]] = true
		}
	}
	if len(unknown) > 0 {
		accepted := "no keys"
		if len(names) > 0 {
			accepted = "only " + strings.Join(names, ", ")
		}
		return Capabilities{}, InvalidConfig("unknown configuration key(s): %s (%s accepts %s)",
			strings.Join(unknown, ", "), info.Name, accepted)
	}
	caps, err := exported.Open(NewConfig(pairs...))
	if err != nil {
		return Capabilities{}, err
	}
	opened = true
	return caps, nil
}

func digest(what string, b []byte) (Digest, error) {
	var d Digest
	if len(b) != len(d) {
		return d, Broken("%s of %d bytes, want %d", what, len(b), len(d))
	}
	copy(d[:], b)
	return d, nil
}

func ready() error {
	if !opened {
		return Broken("called before open")
	}
	return nil
}

func callReadEntry(actionID []byte) (Entry, error) {
	if err := ready(); err != nil {
		return Entry{}, err
	}
	id, err := digest("action id", actionID)
	if err != nil {
		return Entry{}, err
	}
	return exported.ReadEntry(id)
}

func callWriteEntry(actionID []byte, outputID []byte, size, putTimeNs uint64, hostData []byte) error {
	if err := ready(); err != nil {
		return err
	}
	id, err := digest("action id", actionID)
	if err != nil {
		return err
	}
	out, err := digest("output id", outputID)
	if err != nil {
		return err
	}
	if len(hostData) > MaxHostData {
		return Broken("%d bytes of host data, more than the contract's %d", len(hostData), MaxHostData)
	}
	if len(hostData) == 0 {
		// An empty list may come with any address: a Backend sees nil.
		hostData = nil
	}
	return exported.WriteEntry(id, Entry{OutputID: out, Size: size, PutTimeNs: putTimeNs, HostData: hostData})
}

func callReadBody(outputID []byte, size uint64, sink io.Writer) error {
	if err := ready(); err != nil {
		return err
	}
	id, err := digest("output id", outputID)
	if err != nil {
		return err
	}
	return exported.ReadBody(id, size, sink)
}

func callWriteBody(outputID []byte, size uint64, body io.Reader) error {
	if err := ready(); err != nil {
		return err
	}
	id, err := digest("output id", outputID)
	if err != nil {
		return err
	}
	return exported.WriteBody(id, size, body)
}

func callFinish() error {
	if err := ready(); err != nil {
		return err
	}
	return exported.Finish()
}
