// The --config pairs handed to Open, with parsers for the usual kinds of value.

package plugin

import (
	"math"
	"strconv"
	"strings"
	"time"
)

// Config holds the user's --config key=value pairs, in the order given. Each
// Take method removes its key; the last value given for a key wins.
type Config struct {
	pairs [][2]string
}

// NewConfig makes a Config from key=value pairs, as the host passes them;
// for testing a Backend's Open outside a component.
func NewConfig(pairs ...[2]string) *Config {
	return &Config{pairs: pairs}
}

// Take returns the last value given for key, and whether there was one.
func (c *Config) Take(key string) (string, bool) {
	value, found := "", false
	kept := c.pairs[:0]
	for _, p := range c.pairs {
		if p[0] == key {
			value, found = p[1], true
		} else {
			kept = append(kept, p)
		}
	}
	c.pairs = kept
	return value, found
}

// TakeSize parses a byte size such as 4096, 64KiB, 512MiB or 10GB (KB, MB,
// GB, TB are powers of 1000; KiB, MiB, GiB, TiB of 1024).
func (c *Config) TakeSize(key string, def uint64) (uint64, error) {
	v, ok := c.Take(key)
	if !ok {
		return def, nil
	}
	n, ok := ParseSize(v)
	if !ok {
		return 0, InvalidConfig("%s=%s: expected a size such as 512MiB or 10GB", key, v)
	}
	return n, nil
}

// TakeDuration parses a duration such as 90s, 30m, 12h, 5d or 1h30m.
func (c *Config) TakeDuration(key string, def time.Duration) (time.Duration, error) {
	v, ok := c.Take(key)
	if !ok {
		return def, nil
	}
	d, ok := ParseDuration(v)
	if !ok {
		return 0, InvalidConfig("%s=%s: expected a duration such as 90s, 30m, 12h or 5d", key, v)
	}
	return d, nil
}

// TakeBool parses true/false (also yes/no, 1/0).
func (c *Config) TakeBool(key string, def bool) (bool, error) {
	v, ok := c.Take(key)
	if !ok {
		return def, nil
	}
	switch v {
	case "true", "yes", "1":
		return true, nil
	case "false", "no", "0":
		return false, nil
	}
	return false, InvalidConfig("%s=%s: expected true or false", key, v)
}

var sizeUnits = map[string]float64{
	"": 1, "b": 1,
	"kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
	"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
}

// ParseSize parses a byte size such as 4096, 64KiB, 1.5GiB or 10GB.
func ParseSize(s string) (uint64, bool) {
	s = strings.TrimSpace(s)
	split := strings.IndexFunc(s, func(r rune) bool { return (r < '0' || r > '9') && r != '.' })
	if split < 0 {
		split = len(s)
	}
	number, err := strconv.ParseFloat(s[:split], 64)
	unit, known := sizeUnits[strings.ToLower(strings.TrimSpace(s[split:]))]
	if err != nil || !known || number < 0 || number*unit >= math.MaxUint64 {
		return 0, false
	}
	return uint64(number * unit), true
}

var durationUnits = map[string]time.Duration{
	"ns": time.Nanosecond, "us": time.Microsecond, "ms": time.Millisecond,
	"s": time.Second, "m": time.Minute, "h": time.Hour,
	"d": 24 * time.Hour, "w": 7 * 24 * time.Hour,
}

// ParseDuration parses a duration such as 90s, 30m, 12h, 5d or 1h30m: whole
// numbers, each followed by ns, us, ms, s, m, h, d (24h) or w (7d).
func ParseDuration(s string) (time.Duration, bool) {
	s = strings.TrimSpace(s)
	if s == "" {
		return 0, false
	}
	var total time.Duration
	for s != "" {
		digits := strings.IndexFunc(s, func(r rune) bool { return r < '0' || r > '9' })
		if digits <= 0 {
			return 0, false
		}
		letters := strings.IndexFunc(s[digits:], func(r rune) bool { return r >= '0' && r <= '9' })
		if letters < 0 {
			letters = len(s) - digits
		}
		n, err := strconv.ParseInt(s[:digits], 10, 64)
		unit, known := durationUnits[s[digits:digits+letters]]
		if err != nil || !known || n > int64(math.MaxInt64/unit) || total > math.MaxInt64-time.Duration(n)*unit {
			return 0, false
		}
		total += time.Duration(n) * unit
		s = s[digits+letters:]
	}
	return total, true
}
