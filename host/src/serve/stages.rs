//! What an entry or a body goes through between the local tier and the
//! backend, as a sequence of stages, in order. A new step on that path (a
//! compression, a signature, a count of the bytes on the wire) is a stage
//! added here, and get, put and prefetch do not change.
//!
//! A body coming in (backend -> local store), as the backend writes it:
//!   1. counted: the bytes that arrive are what earns the call its time
//!      (`backend::deadline`);
//!   2. held to the size its entry announced: one byte more and the body is
//!      refused;
//!   3. written into the local store's writer, which hashes it: only a body
//!      that hashes to its output id is ever kept (`local::store`).
//!
//! A body going out (local store -> backend): read from the stored file,
//! already verified when it was stored, and counted.
//!
//! An entry coming in, found where the keys this session trusts write it
//! (see `trust`): refused if it claims a size no Go output has, then, when
//! keys are trusted, used only if the key it was looked up for signed exactly
//! it.
//! An entry going out: sealed, that is written where this session's key
//! writes, with its signature as host data (as it is, without a key).
//!
//! It must never let a byte reach the local store other than through the
//! store's verifying writer.

use std::fs::File;
use std::io::{self, Read, Write};

use crate::backend::{CallError, Progress, StoredEntry};
use crate::domain::{Digest, Entry};
use crate::local::store::BodyWriter;
use crate::trust::{Lookup, Trust};

/// The largest body an entry may claim. Go outputs reach hundreds of MB; a
/// claim far beyond that is a broken backend, not a cache entry.
pub const MAX_BODY: u64 = 64 << 30;

/// Where a backend writes a body it supplies.
pub struct BodySink {
    /// Boxed: the writer holds the hash state, and a sink travels by value.
    store: Box<BodyWriter>,
    size: u64,
    written: u64,
    progress: Progress,
    /// Why it refused bytes, once it did: later writes fail the same way.
    refused: Option<String>,
}

/// The way in for a body of `size` bytes, into the store's `writer`, its
/// bytes counted into `progress`.
pub fn body_in(writer: BodyWriter, size: u64, progress: &Progress) -> BodySink {
    BodySink { store: Box::new(writer), size, written: 0, progress: progress.clone(), refused: None }
}

impl BodySink {
    /// The store's writer, holding the whole body, for the store to verify and
    /// keep; or why the body was refused.
    pub fn finish(self) -> Result<BodyWriter, CallError> {
        match self.refused {
            Some(why) => Err(CallError::Broken(why)),
            None => Ok(*self.store),
        }
    }
}

impl Write for BodySink {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        if let Some(why) = &self.refused {
            return Err(io::Error::other(why.clone()));
        }
        self.progress.add(bytes.len());
        if self.written + bytes.len() as u64 > self.size {
            let why = format!("the backend wrote more than the {} bytes of the body", self.size);
            self.refused = Some(why.clone());
            return Err(io::Error::other(why));
        }
        if let Err(e) = self.store.write_all(bytes) {
            self.refused = Some(format!("storing the body: {e}"));
            return Err(e);
        }
        self.written += bytes.len() as u64;
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.store.flush()
    }
}

/// Where a backend reads a body it is given.
pub struct BodySource {
    file: File,
    progress: Progress,
}

/// The way out for a stored body, read from `file`, its bytes counted into
/// `progress`.
pub fn body_out(file: File, progress: &Progress) -> BodySource {
    BodySource { file, progress: progress.clone() }
}

impl Read for BodySource {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read(buf)?;
        self.progress.add(n);
        Ok(n)
    }
}

/// Why an entry from the backend is not used.
pub enum Refused {
    /// The backend answered nonsense.
    Broken(CallError),
    /// Not signed by the key it was looked up for.
    Untrusted,
}

/// Where to look up the entry of `action_id`, in order.
pub fn entry_lookups<'a>(trust: &'a Trust, action_id: &Digest) -> Vec<Lookup<'a>> {
    trust.lookups(action_id)
}

/// An entry the backend returned for `lookup`, as the core may use it.
pub fn entry_in(trust: &Trust, lookup: &Lookup<'_>, action_id: &Digest, stored: StoredEntry) -> Result<Entry, Refused> {
    let StoredEntry { entry, host_data } = stored;
    if entry.size > MAX_BODY {
        return Err(Refused::Broken(CallError::Broken(format!("read-entry claims a body of {} bytes", entry.size))));
    }
    if !trust.accepts(lookup, action_id, &entry, &host_data) {
        return Err(Refused::Untrusted);
    }
    Ok(entry)
}

/// The entry of `action_id` as the backend is given it, and under which key.
pub fn entry_out(trust: &Trust, action_id: &Digest, entry: &Entry) -> (Digest, StoredEntry) {
    let (key, host_data) = trust.seal(action_id, entry);
    (key, StoredEntry { entry: *entry, host_data })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::store::Store;

    #[test]
    fn a_body_is_held_to_its_size_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let progress = Progress::default();
        let mut sink = body_in(store.begin().unwrap(), 4, &progress);
        sink.write_all(b"abc").unwrap();
        assert!(sink.write_all(b"de").is_err(), "one byte too many");
        assert!(sink.write_all(b"d").is_err(), "and nothing after that");
        assert_eq!(progress.moved(), 5, "what arrived before the refusal counts for time");
        assert!(matches!(sink.finish(), Err(CallError::Broken(_))));

        let mut sink = body_in(store.begin().unwrap(), 4, &progress);
        sink.write_all(b"abcd").unwrap();
        let writer = sink.finish().unwrap();
        let id = sha2::Digest::finalize(sha2::Digest::chain_update(sha2::Sha256::default(), b"abcd")).into();
        assert!(store.commit(writer, &id, 4).is_ok());
    }

    #[test]
    fn an_impossible_size_is_refused() {
        let trust = Trust::default();
        let lookup = &entry_lookups(&trust, &[3; 32])[0];
        let entry = Entry { output_id: [1; 32], size: MAX_BODY + 1, put_time_ns: 0 };
        let stored = |entry| StoredEntry { entry, host_data: Vec::new() };
        assert!(matches!(entry_in(&trust, lookup, &[3; 32], stored(entry)), Err(Refused::Broken(_))));
        assert!(entry_in(&trust, lookup, &[3; 32], stored(Entry { size: 5, ..entry })).is_ok());
    }
}
