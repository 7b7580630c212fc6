// The WIT side of each call: converts between the generated bindings' types
// and dispatch.go's, ends the borrows of the host's streams, and gives the
// garbage collector its turn (gc_wasip1.go) at the end of every call.

package plugin

import (
	witTypes "go.bytecodealliance.org/pkg/wit/types"

	"gocp/plugin/internal/wit/export_gocp_cache_backend"
	types "gocp/plugin/internal/wit/gocp_cache_types"
	streams "gocp/plugin/internal/wit/wasi_io_streams"
	// Links the component's exports in; they call export_gocp_cache_backend.
	_ "gocp/plugin/internal/wit/wit_exports"
)

func init() { export_gocp_cache_backend.Calls = witCalls{} }

type witCalls struct{}

func toWIT(err error) types.Error {
	kind, text := kindOf(err)
	switch kind {
	case KindNotFound:
		return types.MakeErrorNotFound()
	case KindUnavailable:
		return types.MakeErrorUnavailable(text)
	case KindInvalidConfig:
		return types.MakeErrorInvalidConfig(text)
	}
	return types.MakeErrorBroken(text)
}

func unitResult(err error) export_gocp_cache_backend.Result {
	if err != nil {
		return witTypes.Err[witTypes.Unit, types.Error](toWIT(err))
	}
	return witTypes.Ok[witTypes.Unit, types.Error](witTypes.Unit{})
}

func (witCalls) Describe() types.Info {
	defer collectIfGrown()
	info := callDescribe()
	keys := make([]types.ConfigKey, len(info.ConfigKeys))
	for i, k := range info.ConfigKeys {
		keys[i] = types.ConfigKey{Name: k.Name, Help: k.Help}
	}
	return types.Info{
		Name:         info.Name,
		Version:      info.Version,
		Summary:      info.Summary,
		MaxInstances: info.MaxInstances,
		ConfigKeys:   keys,
	}
}

func (witCalls) Open(config []witTypes.Tuple2[string, string]) witTypes.Result[types.Capabilities, types.Error] {
	defer collectIfGrown()
	pairs := make([][2]string, len(config))
	for i, p := range config {
		pairs[i] = [2]string{p.F0, p.F1}
	}
	caps, err := callOpen(pairs)
	if err != nil {
		return witTypes.Err[types.Capabilities, types.Error](toWIT(err))
	}
	return witTypes.Ok[types.Capabilities, types.Error](types.Capabilities{StoresBodies: caps.StoresBodies})
}

func (witCalls) ReadEntry(actionID []uint8) witTypes.Result[types.Entry, types.Error] {
	defer collectIfGrown()
	e, err := callReadEntry(actionID)
	if err != nil {
		return witTypes.Err[types.Entry, types.Error](toWIT(err))
	}
	return witTypes.Ok[types.Entry, types.Error](types.Entry{
		OutputId:  e.OutputID[:],
		Size:      e.Size,
		PutTimeNs: e.PutTimeNs,
		HostData:  e.HostData,
	})
}

func (witCalls) WriteEntry(actionID []uint8, entry types.Entry) export_gocp_cache_backend.Result {
	defer collectIfGrown()
	return unitResult(callWriteEntry(actionID, entry.OutputId, entry.Size, entry.PutTimeNs, entry.HostData))
}

// The generated glue hands over the host's stream as a borrowed handle and
// never ends the borrow; the host then fails the call ("borrow handles still
// remain at the end of the call"), so the SDK drops it before returning.

func (witCalls) ReadBody(outputID []uint8, size uint64, sink *streams.OutputStream) export_gocp_cache_backend.Result {
	defer collectIfGrown()
	defer sink.Drop()
	return unitResult(callReadBody(outputID, size, &sinkWriter{stream: sink}))
}

func (witCalls) WriteBody(outputID []uint8, size uint64, body *streams.InputStream) export_gocp_cache_backend.Result {
	defer collectIfGrown()
	defer body.Drop()
	return unitResult(callWriteBody(outputID, size, &bodyReader{stream: body}))
}

func (witCalls) Finish() export_gocp_cache_backend.Result {
	defer collectIfGrown()
	return unitResult(callFinish())
}
