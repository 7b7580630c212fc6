// go-dir: a gocp cache backend in Go, keeping entries and bodies in a
// directory.
//
// Layout under its root (/state unless `path` says otherwise):
//   - entries/<2 hex>/<64 hex action id>: one line, plugin.Entry's Line,
//     "v2 <output hex> <size> <put time ns> <host data hex, or - when empty>"
//     (the format of the shipped Rust plugins, so a directory can change
//     hands; "v1" lines, without host data, are still read).
//   - bodies/<2 hex>/<64 hex output id>: the body.
//
// Every file appears by renaming a complete temporary file in the same
// directory, so any number of instances and go commands can share the root
// without locks. This program owns only that directory: it must never touch
// anything outside it, and never leave a partial file under a final name. It
// does not trim: an example keeps to the contract, a production plugin would
// also expire old files in Finish (see plugins/disk).
//
// It is built as a WebAssembly reactor (build.sh): the host calls the
// backend through gocp/plugin, and main never runs.
package main

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"

	"gocp/plugin"
)

const stateDir = "/state"

func init() { plugin.Export(&store{}) }

func main() {}

// store is one instance's backend; calls into it never overlap.
type store struct {
	root string
}

func (s *store) Describe() plugin.Info {
	return plugin.Info{
		Name:    "go-dir",
		Version: "0.1.0",
		Summary: "example in Go: entries and bodies in a directory",
		// Everything lives in files, so any number of instances may share it.
		MaxInstances: 0,
		ConfigKeys: []plugin.ConfigKey{{
			Name: "path",
			Help: "directory to keep the cache in, as the plugin sees it (default /state; grant others with --allow-dir)",
		}},
	}
}

func (s *store) Open(config *plugin.Config) (plugin.Capabilities, error) {
	root := stateDir
	if v, ok := config.Take("path"); ok {
		root = v
	}
	if !path.IsAbs(root) {
		return plugin.Capabilities{}, plugin.InvalidConfig("path=%s: give the directory as the plugin sees it, from /", root)
	}
	for _, dir := range []string{"entries", "bodies"} {
		if err := os.MkdirAll(path.Join(root, dir), 0o755); err != nil {
			return plugin.Capabilities{}, plugin.InvalidConfig(
				"path=%s: cannot create a directory there (%v); is it granted with --allow-dir?", root, err)
		}
	}
	s.root = root
	return plugin.Capabilities{StoresBodies: true}, nil
}

func (s *store) entryPath(actionID plugin.Digest) string {
	h := actionID.String()
	return path.Join(s.root, "entries", h[:2], h)
}

func (s *store) bodyPath(outputID plugin.Digest) string {
	h := outputID.String()
	return path.Join(s.root, "bodies", h[:2], h)
}

func (s *store) ReadEntry(actionID plugin.Digest) (plugin.Entry, error) {
	p := s.entryPath(actionID)
	text, err := os.ReadFile(p)
	if errors.Is(err, fs.ErrNotExist) {
		return plugin.Entry{}, plugin.ErrNotFound
	}
	if err != nil {
		return plugin.Entry{}, plugin.Broken("reading %s: %w", p, err)
	}
	entry, ok := plugin.ParseEntryLine(string(text))
	if !ok {
		return plugin.Entry{}, plugin.Broken("%s: not an entry line (remove the file to forget it)", p)
	}
	return entry, nil
}

func (s *store) WriteEntry(actionID plugin.Digest, entry plugin.Entry) error {
	return writeAtomically(s.entryPath(actionID), func(f *os.File) error {
		_, err := io.WriteString(f, entry.Line())
		return err
	})
}

func (s *store) ReadBody(outputID plugin.Digest, size uint64, sink io.Writer) error {
	p := s.bodyPath(outputID)
	f, err := os.Open(p)
	if errors.Is(err, fs.ErrNotExist) {
		return plugin.ErrNotFound
	}
	if err != nil {
		return plugin.Broken("opening %s: %w", p, err)
	}
	defer f.Close()
	// A failure of the host's stream keeps its own kind (unavailable); one of
	// the file has none and reaches the host as broken.
	n, err := io.Copy(sink, f)
	if err != nil {
		return fmt.Errorf("sending %s to the host: %w", p, err)
	}
	if uint64(n) != size {
		return plugin.Broken("%s holds %d bytes, the entry says %d", p, n, size)
	}
	return nil
}

func (s *store) WriteBody(outputID plugin.Digest, size uint64, body io.Reader) error {
	final := s.bodyPath(outputID)
	if _, err := os.Stat(final); err == nil {
		// Bodies never change: the one already here is this one.
		return nil
	}
	return writeAtomically(final, func(f *os.File) error {
		n, err := io.Copy(f, body)
		if err != nil {
			return err
		}
		if uint64(n) != size {
			return plugin.Broken("the host sent %d bytes for a body of %d", n, size)
		}
		return nil
	})
}

func (s *store) Finish() error { return nil }

// writeAtomically creates a temporary file next to final (creating its shard
// directory on first use), lets fill write it, and renames it into place; on
// any failure it removes the temporary file.
func writeAtomically(final string, fill func(*os.File) error) error {
	dir := path.Dir(final)
	// Random names (CreateTemp's), not a counter: several instances write
	// into the same directory.
	f, err := os.CreateTemp(dir, ".tmp-*")
	if errors.Is(err, fs.ErrNotExist) {
		if err = os.MkdirAll(dir, 0o755); err == nil {
			f, err = os.CreateTemp(dir, ".tmp-*")
		}
	}
	if err != nil {
		return plugin.Broken("creating a temporary file in %s: %w", dir, err)
	}
	tmp := f.Name()
	err = fill(f)
	if closeErr := f.Close(); err == nil && closeErr != nil {
		err = plugin.Broken("writing %s: %w", tmp, closeErr)
	}
	if err == nil {
		if err = os.Rename(tmp, final); err != nil {
			err = plugin.Broken("renaming %s to %s: %w", tmp, final, err)
		}
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("writing %s: %w", final, err)
	}
	return nil
}
