// The host's body streams (wasi:io input and output streams) as an io.Reader
// and an io.Writer. Both also implement the io.Copy fast paths (WriterTo,
// ReaderFrom), so that io.Copy between a body and a file moves 1 MiB at a
// time through one buffer.

package plugin

import (
	"io"

	witRuntime "go.bytecodealliance.org/pkg/wit/runtime"

	streams "gocp/plugin/internal/wit/wasi_io_streams"
)

// How much one read or write asks of the host: large enough that an 8 MiB
// body takes a handful of calls into the host.
const chunkSize = 1 << 20

// bodyReader reads a body from the host (WriteBody's argument).
type bodyReader struct {
	stream *streams.InputStream
	// io.EOF once the stream has ended, or why it failed.
	err error
	// Bytes received since the last look at the heap: every chunk is a fresh
	// allocation, garbage as soon as it has been copied out.
	unchecked int
}

// next returns the host's next chunk, of at most limit bytes.
func (r *bodyReader) next(limit int) ([]byte, error) {
	if r.err != nil {
		return nil, r.err
	}
	res := r.stream.BlockingRead(uint64(limit))
	// The chunk was allocated (and pinned, for the host to fill) by
	// cabi_realloc; the slice refers to it now, so unpinning lets the
	// collector free it once it has been used.
	witRuntime.Unpin()
	if res.IsErr() {
		if res.Err().Tag() == streams.StreamErrorClosed {
			r.err = io.EOF
		} else {
			r.err = streamError(res.Err(), "reading the body from the host")
		}
		return nil, r.err
	}
	chunk := res.Ok()
	r.unchecked += len(chunk)
	if r.unchecked >= minCollectHeap {
		r.unchecked = 0
		collectIfGrown()
	}
	return chunk, nil
}

func (r *bodyReader) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	// The host returns at most what is asked for, so nothing is left over.
	chunk, err := r.next(min(len(p), chunkSize))
	return copy(p, chunk), err
}

func (r *bodyReader) WriteTo(w io.Writer) (int64, error) {
	var total int64
	for {
		chunk, err := r.next(chunkSize)
		if err == io.EOF {
			return total, nil
		}
		if err != nil {
			return total, err
		}
		n, err := w.Write(chunk)
		total += int64(n)
		if err != nil {
			return total, err
		}
	}
}

// sinkWriter writes a body to the host (ReadBody's argument).
type sinkWriter struct {
	stream *streams.OutputStream
}

func (w *sinkWriter) Write(p []byte) (int, error) {
	written := 0
	for written < len(p) {
		permit := w.stream.CheckWrite()
		if permit.IsErr() {
			return written, streamError(permit.Err(), "writing the body to the host")
		}
		n := permit.Ok()
		if n == 0 {
			// The host's buffer is full: wait until it takes more.
			ready := w.stream.Subscribe()
			ready.Block()
			ready.Drop()
			continue
		}
		end := written + int(min(n, uint64(len(p)-written)))
		if res := w.stream.Write(p[written:end]); res.IsErr() {
			return written, streamError(res.Err(), "writing the body to the host")
		}
		written = end
	}
	return written, nil
}

// copyBuffer is ReadFrom's buffer, kept for the instance's life: calls into
// an instance never overlap, and a buffer per call would be 1 MiB of garbage.
var copyBuffer []byte

func (w *sinkWriter) ReadFrom(src io.Reader) (int64, error) {
	if copyBuffer == nil {
		copyBuffer = make([]byte, chunkSize)
	}
	var total int64
	for {
		n, err := src.Read(copyBuffer)
		if n > 0 {
			if _, werr := w.Write(copyBuffer[:n]); werr != nil {
				return total, werr
			}
			total += int64(n)
		}
		if err == io.EOF {
			return total, nil
		}
		if err != nil {
			return total, err
		}
	}
}

// streamError describes a failed stream operation as an unavailable error:
// the host's end of the stream gave up (a deadline, the go command gone), not
// the plugin's storage.
func streamError(e streams.StreamError, doing string) error {
	if e.Tag() == streams.StreamErrorClosed {
		return Unavailable("%s: the host closed the stream", doing)
	}
	failure := e.LastOperationFailed()
	defer failure.Drop()
	return Unavailable("%s: %s", doing, failure.ToDebugString())
}
