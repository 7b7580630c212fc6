//! The WASI streams through which bodies cross into and out of a plugin.
//!
//! `ReadStream` lets a plugin read a body it is given (for `write-body`);
//! `WriteStream` takes what a plugin writes (for `read-body`) into the serving
//! core's sink, which counts, bounds and verifies it (`serve::stages`). Both
//! work blocking: plugin calls run on dedicated threads, never on an async
//! executor.

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use wasmtime_wasi::p2::{InputStream, OutputStream, Pollable, StreamError, StreamResult};

/// How much a plugin may read or write per call: large enough that a body
/// crosses in few calls, small enough to bound the copy held in memory.
const CHUNK: usize = 1 << 20;

pub struct ReadStream<R> {
    source: R,
}

impl<R: Read + Send + 'static> ReadStream<R> {
    pub fn new(source: R) -> Self {
        ReadStream { source }
    }
}

#[wasmtime_wasi::async_trait]
impl<R: Send + 'static> Pollable for ReadStream<R> {
    async fn ready(&mut self) {}
}

impl<R: Read + Send + 'static> InputStream for ReadStream<R> {
    fn read(&mut self, size: usize) -> StreamResult<Bytes> {
        let mut buf = vec![0u8; size.min(CHUNK)];
        let n = self.source.read(&mut buf).map_err(|e| StreamError::LastOperationFailed(e.into()))?;
        if n == 0 && size > 0 {
            return Err(StreamError::Closed);
        }
        buf.truncate(n);
        Ok(Bytes::from(buf))
    }
}

/// The sink behind a [`WriteStream`], for the host to take back once the
/// call returns: the stream itself lives in the plugin's resource table.
pub struct SinkHandle<W>(Arc<Mutex<Option<W>>>);

impl<W> SinkHandle<W> {
    pub fn take(self) -> Option<W> {
        self.0.lock().unwrap().take()
    }
}

pub struct WriteStream<W> {
    sink: Arc<Mutex<Option<W>>>,
}

impl<W: Write + Send + 'static> WriteStream<W> {
    pub fn new(sink: W) -> (Self, SinkHandle<W>) {
        let sink = Arc::new(Mutex::new(Some(sink)));
        (WriteStream { sink: sink.clone() }, SinkHandle(sink))
    }
}

#[wasmtime_wasi::async_trait]
impl<W: Send + 'static> Pollable for WriteStream<W> {
    async fn ready(&mut self) {}
}

impl<W: Write + Send + 'static> OutputStream for WriteStream<W> {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        let mut sink = self.sink.lock().unwrap();
        let sink = sink.as_mut().ok_or(StreamError::Closed)?;
        // The sink refuses what it must not take (a body longer than its
        // entry said, a full disk) and says why when the call returns.
        sink.write_all(&bytes).map_err(|_| StreamError::Closed)
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(CHUNK)
    }
}
