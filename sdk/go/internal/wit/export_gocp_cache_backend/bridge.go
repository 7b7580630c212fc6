// Package export_gocp_cache_backend is where the generated export glue
// (../wit_exports) sends each call of gocp's backend interface. It is written
// by hand, not generated: it only forwards to the Calls that package plugin
// installs at init, because the glue cannot import package plugin itself
// (plugin imports the glue, to link the exports in).
package export_gocp_cache_backend

import (
	witTypes "go.bytecodealliance.org/pkg/wit/types"

	"gocp/plugin/internal/wit/gocp_cache_types"
	"gocp/plugin/internal/wit/wasi_io_streams"
)

// Result is the WIT result of the calls that return nothing on success.
type Result = witTypes.Result[witTypes.Unit, gocp_cache_types.Error]

// Handler answers the backend interface's calls in WIT types.
type Handler interface {
	Describe() gocp_cache_types.Info
	Open(config []witTypes.Tuple2[string, string]) witTypes.Result[gocp_cache_types.Capabilities, gocp_cache_types.Error]
	ReadEntry(actionID []uint8) witTypes.Result[gocp_cache_types.Entry, gocp_cache_types.Error]
	ReadBody(outputID []uint8, size uint64, sink *wasi_io_streams.OutputStream) Result
	WriteBody(outputID []uint8, size uint64, body *wasi_io_streams.InputStream) Result
	WriteEntry(actionID []uint8, entry gocp_cache_types.Entry) Result
	Finish() Result
}

// Calls is set once, by package plugin's init, before the host makes any call.
var Calls Handler

func Describe() gocp_cache_types.Info { return Calls.Describe() }

func Open(config []witTypes.Tuple2[string, string]) witTypes.Result[gocp_cache_types.Capabilities, gocp_cache_types.Error] {
	return Calls.Open(config)
}

func ReadEntry(actionID []uint8) witTypes.Result[gocp_cache_types.Entry, gocp_cache_types.Error] {
	return Calls.ReadEntry(actionID)
}

func ReadBody(outputID []uint8, size uint64, sink *wasi_io_streams.OutputStream) Result {
	return Calls.ReadBody(outputID, size, sink)
}

func WriteBody(outputID []uint8, size uint64, body *wasi_io_streams.InputStream) Result {
	return Calls.WriteBody(outputID, size, body)
}

func WriteEntry(actionID []uint8, entry gocp_cache_types.Entry) Result {
	return Calls.WriteEntry(actionID, entry)
}

func Finish() Result { return Calls.Finish() }
