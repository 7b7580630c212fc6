// Digests and entries, and the one-line text form of an entry that gocp's
// shipped plugins store.

package plugin

import (
	"encoding/hex"
	"fmt"
	"strconv"
	"strings"
)

// Digest is a SHA-256 digest: an action id or an output id.
type Digest [32]byte

// String is the digest in lower-case hex, the usual file or key name.
func (d Digest) String() string { return hex.EncodeToString(d[:]) }

// ParseDigest parses 64 lower-case hex digits.
func ParseDigest(s string) (Digest, bool) {
	var d Digest
	if len(s) != 2*len(d) || strings.ToLower(s) != s {
		return d, false
	}
	_, err := hex.Decode(d[:], []byte(s))
	return d, err == nil
}

// Entry is what an action produced (see `entry` in the WIT file).
type Entry struct {
	// SHA-256 of the body.
	OutputID Digest
	// The body's length in bytes.
	Size uint64
	// When the entry was first stored, in nanoseconds since the Unix epoch.
	// Keep the value WriteEntry was given: the go command expires cached
	// test results by it.
	PutTimeNs uint64
	// Bytes the host attaches to the entry: a signature over it when the
	// user signs what builds write, else none (nil). Opaque to the plugin:
	// store them with the entry and return them from ReadEntry exactly as
	// WriteEntry gave them, or the host refuses the entry. At most
	// MaxHostData bytes.
	HostData []byte
}

// MaxHostData is the most host data an entry carries; WriteEntry never sees
// more (the SDK refuses it as broken).
const MaxHostData = 1024

// Line is the entry as one line of text, "v2 <output hex> <size> <put time
// ns> <host data hex, or - when empty>\n": the format of gocp's shipped
// plugins, so a directory of entries can change hands between them. A plugin
// may store entries any way it likes.
func (e Entry) Line() string {
	hostData := "-"
	if len(e.HostData) > 0 {
		hostData = hex.EncodeToString(e.HostData)
	}
	return fmt.Sprintf("v2 %s %d %d %s\n", e.OutputID, e.Size, e.PutTimeNs, hostData)
}

// ParseEntryLine parses what Line wrote, and the "v1" lines of earlier
// versions (the same without host data); false for anything else.
func ParseEntryLine(text string) (Entry, bool) {
	fields := strings.Split(strings.TrimRight(text, "\n"), " ")
	var hostData []byte
	switch {
	case len(fields) == 4 && fields[0] == "v1":
	case len(fields) == 5 && fields[0] == "v2":
		var ok bool
		if hostData, ok = parseHostData(fields[4]); !ok {
			return Entry{}, false
		}
	default:
		return Entry{}, false
	}
	id, ok := ParseDigest(fields[1])
	size, err1 := strconv.ParseUint(fields[2], 10, 64)
	putTime, err2 := strconv.ParseUint(fields[3], 10, 64)
	if !ok || err1 != nil || err2 != nil {
		return Entry{}, false
	}
	return Entry{OutputID: id, Size: size, PutTimeNs: putTime, HostData: hostData}, true
}

// parseHostData parses the last field of a v2 line: "-", or lower-case hex of
// at most MaxHostData bytes.
func parseHostData(s string) ([]byte, bool) {
	if s == "-" {
		return nil, true
	}
	if s == "" || len(s) > 2*MaxHostData || strings.ToLower(s) != s {
		return nil, false
	}
	b, err := hex.DecodeString(s)
	return b, err == nil
}
