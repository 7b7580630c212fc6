// When Go's garbage collector may run inside a plugin instance.
//
// The host hands lists to the plugin (config strings, digests, every chunk
// that blocking-read returns) by calling the exported cabi_realloc, which
// allocates on the Go heap. An allocation may run a collection, and a
// collection calls WASI (the clock; poll_oneoff while its workers wait); the
// component model forbids calling imports from inside cabi_realloc, so the
// instance traps ("cannot leave component instance") and is lost, typically
// after some megabytes of bodies. So the automatic collector is off, and the SDK
// collects itself, at points outside cabi_realloc: at the end of every call,
// and while a body is being read, whenever the heap has grown enough since the
// last collection to be worth one (the rule GOGC=100 applies, with a floor).

package plugin

import (
	"runtime"
	"runtime/debug"
	"runtime/metrics"
)

// Below this much heap in use, collecting is not worth its time.
const minCollectHeap = 16 << 20

func init() { debug.SetGCPercent(-1) }

var heapSamples = []metrics.Sample{
	// Live heap as of the last collection.
	{Name: "/gc/heap/live:bytes"},
	// Heap in use now: live objects and garbage not yet collected.
	{Name: "/memory/classes/heap/objects:bytes"},
}

// collectIfGrown collects when the heap in use has doubled since the last
// collection (and is past the floor). Never call it from cabi_realloc.
func collectIfGrown() {
	metrics.Read(heapSamples)
	live, inUse := heapSamples[0].Value.Uint64(), heapSamples[1].Value.Uint64()
	if inUse > max(2*live, minCollectHeap) {
		runtime.GC()
	}
}
