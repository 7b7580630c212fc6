//! The WASI streams through which bodies cross into and out of a plugin.
//!
//! `FileSource` lets a plugin read a stored body (for `write-body`); `BodySink`
//! takes what a plugin writes (for `read-body`) into any writer, refusing
//! anything past the announced size. Both work on plain blocking files: plugin
//! calls run on dedicated threads, never on an async executor. Both count the
//! bytes that cross them, which is what earns a body call its time (see
//! `deadline`).

use std::fs::File;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use wasmtime_wasi::p2::{InputStream, OutputStream, Pollable, StreamError, StreamResult};

use super::deadline::Progress;

/// How much a plugin may read or write per call: large enough that a body
/// crosses in few calls, small enough to bound the copy held in memory.
const CHUNK: usize = 1 << 20;

pub struct FileSource {
    file: File,
    progress: Progress,
}

impl FileSource {
    pub fn new(file: File, progress: Progress) -> Self {
        FileSource { file, progress }
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for FileSource {
    async fn ready(&mut self) {}
}

impl InputStream for FileSource {
    fn read(&mut self, size: usize) -> StreamResult<Bytes> {
        let mut buf = vec![0u8; size.min(CHUNK)];
        let n = self.file.read(&mut buf).map_err(|e| StreamError::LastOperationFailed(e.into()))?;
        if n == 0 && size > 0 {
            return Err(StreamError::Closed);
        }
        buf.truncate(n);
        self.progress.add(n);
        Ok(Bytes::from(buf))
    }
}

/// The writer behind a [`BodySink`], shared so the host can take it back once
/// the plugin call returns (the sink itself lives in the plugin's resource table).
pub struct SinkTarget<W> {
    pub writer: W,
    pub written: u64,
    pub limit: u64,
    /// Set when the plugin wrote more than `limit` or the writer failed.
    pub failed: Option<String>,
}

pub struct BodySink<W> {
    target: Arc<Mutex<SinkTarget<W>>>,
    progress: Progress,
}

impl<W: Write + Send + 'static> BodySink<W> {
    pub fn new(writer: W, limit: u64, progress: Progress) -> (Self, Arc<Mutex<SinkTarget<W>>>) {
        let target = Arc::new(Mutex::new(SinkTarget { writer, written: 0, limit, failed: None }));
        (BodySink { target: target.clone(), progress }, target)
    }
}

#[wasmtime_wasi::async_trait]
impl<W: Send + 'static> Pollable for BodySink<W> {
    async fn ready(&mut self) {}
}

impl<W: Write + Send + 'static> OutputStream for BodySink<W> {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        let mut t = self.target.lock().unwrap();
        if t.failed.is_some() {
            return Err(StreamError::Closed);
        }
        if t.written + bytes.len() as u64 > t.limit {
            t.failed = Some(format!("plugin wrote more than the {} bytes of the body", t.limit));
            return Err(StreamError::Closed);
        }
        if let Err(e) = t.writer.write_all(&bytes) {
            t.failed = Some(format!("storing the body: {e}"));
            return Err(StreamError::LastOperationFailed(e.into()));
        }
        t.written += bytes.len() as u64;
        self.progress.add(bytes.len());
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        let t = self.target.lock().unwrap();
        if t.failed.is_some() {
            return Err(StreamError::Closed);
        }
        Ok(CHUNK)
    }
}
