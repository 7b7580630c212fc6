// Tests of the SDK's plain-Go side (configuration, entries, errors, what
// happens to a call before the Backend sees it), run natively with `go test`;
// tests/examples.rs runs them, and covers the WIT side with real components.

package plugin

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestParseSize(t *testing.T) {
	for in, want := range map[string]uint64{
		"4096": 4096, "0": 0, "64KiB": 64 << 10, "512MiB": 512 << 20, "10GB": 10_000_000_000,
		"1.5GiB": 3 << 29, " 2 mib ": 2 << 20, "7B": 7,
	} {
		if got, ok := ParseSize(in); !ok || got != want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", in, got, ok, want)
		}
	}
	for _, in := range []string{"", "lots", "MiB", "-1", "12XB", "1e30TB"} {
		if got, ok := ParseSize(in); ok {
			t.Errorf("ParseSize(%q) = %d, want a refusal", in, got)
		}
	}
}

func TestParseDuration(t *testing.T) {
	for in, want := range map[string]time.Duration{
		"90s": 90 * time.Second, "30m": 30 * time.Minute, "12h": 12 * time.Hour,
		"5d": 5 * 24 * time.Hour, "2w": 14 * 24 * time.Hour, "1h30m": 90 * time.Minute, "250ms": 250 * time.Millisecond,
	} {
		if got, ok := ParseDuration(in); !ok || got != want {
			t.Errorf("ParseDuration(%q) = %v, %v; want %v", in, got, ok, want)
		}
	}
	for _, in := range []string{"", "soon", "5", "d", "5y", "1.5h", "99999999999w"} {
		if got, ok := ParseDuration(in); ok {
			t.Errorf("ParseDuration(%q) = %v, want a refusal", in, got)
		}
	}
}

func TestConfigTakesTheLastValueAndRemovesTheKey(t *testing.T) {
	c := NewConfig([2]string{"path", "/a"}, [2]string{"max-size", "1GiB"}, [2]string{"path", "/b"})
	if v, ok := c.Take("path"); !ok || v != "/b" {
		t.Fatalf("Take(path) = %q, %v", v, ok)
	}
	if _, ok := c.Take("path"); ok {
		t.Fatal("a key is taken once")
	}
	if n, err := c.TakeSize("max-size", 1); err != nil || n != 1<<30 {
		t.Fatalf("TakeSize = %d, %v", n, err)
	}
	if d, err := c.TakeDuration("max-age", time.Hour); err != nil || d != time.Hour {
		t.Fatalf("a missing key gives the default: %v, %v", d, err)
	}
}

func TestConfigValueErrorsAreInvalidConfigAndNameTheKey(t *testing.T) {
	c := NewConfig([2]string{"bodies", "maybe"}, [2]string{"max-age", "soon"}, [2]string{"max-size", "big"})
	_, errBool := c.TakeBool("bodies", false)
	_, errDuration := c.TakeDuration("max-age", 0)
	_, errSize := c.TakeSize("max-size", 0)
	for _, err := range []error{errBool, errDuration, errSize} {
		kind, text := kindOf(err)
		if kind != KindInvalidConfig || !strings.Contains(text, "=") || !strings.Contains(text, "expected") {
			t.Errorf("%v: kind %v", err, kind)
		}
	}
	yes := NewConfig([2]string{"a", "yes"}, [2]string{"b", "0"})
	a, _ := yes.TakeBool("a", false)
	b, _ := yes.TakeBool("b", true)
	if !a || b {
		t.Errorf("TakeBool: a=%v b=%v", a, b)
	}
}

func TestEntryLinesRoundTrip(t *testing.T) {
	e := Entry{OutputID: Digest{0xab, 1, 2}, Size: 1 << 40, PutTimeNs: 1_700_000_000_123_456_789}
	line := e.Line()
	if !strings.HasPrefix(line, "v2 ab0102") || !strings.HasSuffix(line, " 1099511627776 1700000000123456789 -\n") {
		t.Fatalf("Line() = %q", line)
	}
	if got, ok := ParseEntryLine(line); !ok || !reflect.DeepEqual(got, e) {
		t.Fatalf("ParseEntryLine(%q) = %+v, %v", line, got, ok)
	}
	signed := e
	signed.HostData = []byte{1, 0xfe, 7}
	signedLine := signed.Line()
	if !strings.HasSuffix(signedLine, " 1700000000123456789 01fe07\n") {
		t.Fatalf("Line() = %q", signedLine)
	}
	if got, ok := ParseEntryLine(signedLine); !ok || !reflect.DeepEqual(got, signed) {
		t.Fatalf("ParseEntryLine(%q) = %+v, %v", signedLine, got, ok)
	}
	largest := e
	largest.HostData = make([]byte, MaxHostData)
	if got, ok := ParseEntryLine(largest.Line()); !ok || len(got.HostData) != MaxHostData {
		t.Fatalf("host data of %d bytes: %v", MaxHostData, ok)
	}

	v1 := "v1" + line[2:len(line)-3] + "\n"
	if got, ok := ParseEntryLine(v1); !ok || !reflect.DeepEqual(got, e) {
		t.Fatalf("lines of earlier versions still read: ParseEntryLine(%q) = %+v, %v", v1, got, ok)
	}

	tooMuch := e
	tooMuch.HostData = make([]byte, MaxHostData+1)
	fields := line[:len(line)-3]
	for _, bad := range []string{
		"", "v3" + line[2:], strings.ToUpper(line), strings.ToUpper(signedLine), line[:40], fields + " extra\n",
		fields + "\n", fields + " \n", fields + " 0g\n", fields + " 012\n", v1[:len(v1)-1] + " -\n",
		"v2 " + line[3:67] + " x 1 -", tooMuch.Line(),
	} {
		if _, ok := ParseEntryLine(bad); ok {
			t.Errorf("ParseEntryLine(%q) accepted", bad)
		}
	}
}

func TestErrorKindsSurviveWrapping(t *testing.T) {
	cause := errors.New("disk on fire")
	cases := []struct {
		err  error
		kind ErrorKind
		text string
	}{
		{ErrNotFound, KindNotFound, "not-found"},
		{fmt.Errorf("entry x: %w", ErrNotFound), KindNotFound, "entry x: not-found"},
		{Unavailable("server said %d", 503), KindUnavailable, "server said 503"},
		{fmt.Errorf("sending: %w", Unavailable("timeout")), KindUnavailable, "sending: timeout"},
		{Broken("reading %s: %w", "/x", cause), KindBroken, "reading /x: disk on fire"},
		{InvalidConfig("path=%s: no", "/y"), KindInvalidConfig, "path=/y: no"},
		{cause, KindBroken, "disk on fire"},
	}
	for _, c := range cases {
		if kind, text := kindOf(c.err); kind != c.kind || text != c.text {
			t.Errorf("kindOf(%v) = %v %q, want %v %q", c.err, kind, text, c.kind, c.text)
		}
	}
	if !errors.Is(Broken("reading: %w", cause), cause) {
		t.Error("%w keeps the cause for errors.Is")
	}
	if !errors.Is(fmt.Errorf("x: %w", &Error{Kind: KindNotFound}), ErrNotFound) {
		t.Error("any not-found error is ErrNotFound")
	}
	if errors.Is(Broken("x"), ErrNotFound) {
		t.Error("a broken error is not ErrNotFound")
	}
}

// recorder is a Backend that notes what reached it.
type recorder struct {
	opened   []string
	openErr  error
	actionID Digest
	written  []Entry
}

func (r *recorder) Describe() Info {
	return Info{Name: "rec", Version: "1", ConfigKeys: []ConfigKey{{Name: "path"}, {Name: "url"}}}
}

func (r *recorder) Open(c *Config) (Capabilities, error) {
	v, _ := c.Take("path")
	r.opened = append(r.opened, v)
	return Capabilities{StoresBodies: true}, r.openErr
}

func (r *recorder) ReadEntry(id Digest) (Entry, error) {
	r.actionID = id
	return Entry{}, ErrNotFound
}

func (r *recorder) WriteEntry(_ Digest, e Entry) error {
	r.written = append(r.written, e)
	return nil
}

func (r *recorder) ReadBody(Digest, uint64, io.Writer) error  { return nil }
func (r *recorder) WriteBody(Digest, uint64, io.Reader) error { return nil }
func (r *recorder) Finish() error                             { return nil }

func withBackend(t *testing.T, b Backend) {
	exported, opened = b, false
	t.Cleanup(func() { exported, opened = nil, false })
}

func TestUndeclaredKeysAreRejectedBeforeOpen(t *testing.T) {
	r := &recorder{}
	withBackend(t, r)
	_, err := callOpen([][2]string{{"path", "/p"}, {"colour", "red"}, {"size", "1"}, {"colour", "blue"}})
	kind, text := kindOf(err)
	if kind != KindInvalidConfig || text != "unknown configuration key(s): colour, size (rec accepts only path, url)" {
		t.Fatalf("got %v %q", kind, text)
	}
	if len(r.opened) != 0 {
		t.Fatal("Open ran despite an unknown key")
	}
	if _, err := callReadEntry(make([]byte, 32)); err == nil || !strings.Contains(err.Error(), "before open") {
		t.Fatalf("a call before a successful open: %v", err)
	}
	caps, err := callOpen([][2]string{{"path", "/p"}})
	if err != nil || !caps.StoresBodies || len(r.opened) != 1 || r.opened[0] != "/p" {
		t.Fatalf("open: %+v %v %v", caps, err, r.opened)
	}
}

func TestAFailedOpenLeavesTheInstanceClosed(t *testing.T) {
	withBackend(t, &recorder{openErr: InvalidConfig("path=/p: no such directory")})
	if _, err := callOpen(nil); err == nil {
		t.Fatal("open's error is returned")
	}
	if err := callFinish(); err == nil {
		t.Fatal("calls after a failed open are refused")
	}
}

func TestDigestsAreCheckedAndPassedOn(t *testing.T) {
	r := &recorder{}
	withBackend(t, r)
	if _, err := callOpen(nil); err != nil {
		t.Fatal(err)
	}
	id := make([]byte, 32)
	id[31] = 7
	if _, err := callReadEntry(id); !errors.Is(err, ErrNotFound) || r.actionID[31] != 7 {
		t.Fatalf("read-entry: %v, %v", err, r.actionID)
	}
	if err := callWriteEntry(id, make([]byte, 31), 1, 2, nil); err == nil || !strings.Contains(err.Error(), "output id of 31 bytes") {
		t.Fatalf("a short output id: %v", err)
	}
	if _, err := callReadEntry(nil); err == nil {
		t.Fatal("an empty action id is refused")
	}
}

func TestExportTwicePanics(t *testing.T) {
	withBackend(t, &recorder{})
	defer func() {
		if recover() == nil {
			t.Fatal("a second Export must panic")
		}
	}()
	Export(&recorder{})
}

func TestHostDataIsPassedOnAndBounded(t *testing.T) {
	r := &recorder{}
	withBackend(t, r)
	if _, err := callOpen(nil); err != nil {
		t.Fatal(err)
	}
	id, out := make([]byte, 32), make([]byte, 32)
	signature := []byte{9, 8, 7}
	for _, hostData := range [][]byte{signature, make([]byte, MaxHostData), {}, nil} {
		if err := callWriteEntry(id, out, 1, 2, hostData); err != nil {
			t.Fatalf("%d bytes of host data: %v", len(hostData), err)
		}
	}
	if len(r.written) != 4 || !bytes.Equal(r.written[0].HostData, signature) || len(r.written[1].HostData) != MaxHostData {
		t.Fatalf("written: %+v", r.written)
	}
	if r.written[2].HostData != nil || r.written[3].HostData != nil {
		t.Fatalf("no host data is nil: %#v, %#v", r.written[2].HostData, r.written[3].HostData)
	}
	err := callWriteEntry(id, out, 1, 2, make([]byte, MaxHostData+1))
	if kind, text := kindOf(err); kind != KindBroken || !strings.Contains(text, "1025 bytes of host data") {
		t.Fatalf("too much host data: %v %q", kind, text)
	}
	if len(r.written) != 4 {
		t.Fatal("an entry with too much host data reached the Backend")
	}
}
