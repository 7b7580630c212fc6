// The four ways a call can fail (see `error` in the WIT file), as Go errors.

package plugin

import (
	"errors"
	"fmt"
)

// ErrorKind is which of the contract's errors a call returns. Each makes the
// host behave differently, so pick the one that is true.
type ErrorKind int

const (
	// KindNotFound: the thing asked for is not stored, an ordinary miss.
	KindNotFound ErrorKind = iota + 1
	// KindUnavailable: the backend cannot answer now but may later (network
	// down, timeout, throttled, credentials refused). After repeated ones the
	// host stops calling the plugin for a while.
	KindUnavailable
	// KindBroken: retrying will not help (corrupt data, a bug).
	KindBroken
	// KindInvalidConfig: only from Open; the host stops and prints the message.
	KindInvalidConfig
)

func (k ErrorKind) String() string {
	switch k {
	case KindNotFound:
		return "not-found"
	case KindUnavailable:
		return "unavailable"
	case KindBroken:
		return "broken"
	case KindInvalidConfig:
		return "invalid-config"
	}
	return fmt.Sprintf("ErrorKind(%d)", int(k))
}

// Error is an error of a known kind. Wrapping one (fmt.Errorf with %w) keeps
// its kind; an error of no kind at all reaches the host as broken.
type Error struct {
	Kind    ErrorKind
	Message string
	// The error it was made from, if any (for errors.Is and errors.As).
	Cause error
}

func (e *Error) Error() string {
	if e.Message == "" {
		return e.Kind.String()
	}
	return e.Message
}

func (e *Error) Unwrap() error { return e.Cause }

// Is makes every not-found error match ErrNotFound.
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	return ok && t == ErrNotFound && e.Kind == KindNotFound
}

// ErrNotFound is the ordinary miss: return it (or wrap it) when there is no
// entry for an action id or no body for an output id.
var ErrNotFound = &Error{Kind: KindNotFound}

// Unavailable says the backend cannot answer now but may later. The arguments
// are fmt.Errorf's, so %w wraps a cause.
func Unavailable(format string, args ...any) error { return newError(KindUnavailable, format, args) }

// Broken says the plugin or its data is in a state retrying will not fix.
func Broken(format string, args ...any) error { return newError(KindBroken, format, args) }

// InvalidConfig says a configuration value is wrong; the message is what the
// user reads, so make it say what to change. Only Open returns it.
func InvalidConfig(format string, args ...any) error {
	return newError(KindInvalidConfig, format, args)
}

func newError(kind ErrorKind, format string, args []any) error {
	wrapped := fmt.Errorf(format, args...)
	return &Error{Kind: kind, Message: wrapped.Error(), Cause: errors.Unwrap(wrapped)}
}

// kindOf sorts any error a Backend returns into the contract's four: its own
// kind when it is or wraps an *Error, broken otherwise. The message is the
// whole error's text, so context added by wrapping reaches the user.
func kindOf(err error) (ErrorKind, string) {
	var e *Error
	if errors.As(err, &e) {
		return e.Kind, err.Error()
	}
	return KindBroken, err.Error()
}
