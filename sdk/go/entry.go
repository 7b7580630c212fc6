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
}

// Line is the entry as one line of text, "v1 <output hex> <size> <put time
// ns>\n": the format of gocp's shipped plugins, so a directory of entries can
// change hands between them. A plugin may store entries any way it likes.
func (e Entry) Line() string {
	return fmt.Sprintf("v1 %s %d %d\n", e.OutputID, e.Size, e.PutTimeNs)
}

// ParseEntryLine parses what Line wrote; false for anything else.
func ParseEntryLine(text string) (Entry, bool) {
	fields := strings.Split(strings.TrimRight(text, "\n"), " ")
	if len(fields) != 4 || fields[0] != "v1" {
		return Entry{}, false
	}
	id, ok := ParseDigest(fields[1])
	size, err1 := strconv.ParseUint(fields[2], 10, 64)
	putTime, err2 := strconv.ParseUint(fields[3], 10, 64)
	if !ok || err1 != nil || err2 != nil {
		return Entry{}, false
	}
	return Entry{OutputID: id, Size: size, PutTimeNs: putTime}, true
}
