//! What an entry or a body goes through between the local tier and the
//! backend, as a sequence of stages, in order. A new step on that path (a
//! compression, a signature, a count of the bytes on the wire) is a stage
//! added here, and get, put and prefetch do not change.
//!
//! A body coming in (backend -> local store), as the backend writes it:
//!   1. counted: the bytes that arrive are what earns the call its time
//!      (`backend::deadline`);
//!   2. held to the size its entry says it is stored with: one byte more and
//!      the body is refused;
//!   3. decompressed, if its entry says it is stored compressed, and held
//!      to the size the go command's entry announced;
//!   4. written into the local store's writer, which hashes it: only a body
//!      that hashes to its output id is ever kept (`local::store`).
//!
//! A body going out (local store -> backend): read from the stored file,
//! already verified when it was stored; compressed with zstd when the
//! session compresses and that saves at least a tenth, and then stored under
//! the hash of the compressed bytes; carried inside its entry instead of
//! sent when what would be sent is small (`host_data::MAX_INLINE`) and the
//! backend keeps host data: most Go outputs are that small, and each saves a
//! request; counted.
//!
//! A body carried in its entry comes in through the same stages as one a
//! backend writes (3 and 4), without a call.
//!
//! An entry coming in, found where the keys this session trusts write it
//! (see `trust`): its host data read (`host_data`: how the body is stored,
//! the signature), refused if it claims a size no Go output has, then, when
//! keys are trusted, used only if the key it was looked up for signed exactly
//! it and how its body is stored.
//! An entry going out: sealed, that is written where this session's key
//! writes, with how its body is stored and its signature as host data.
//!
//! It must never let a byte reach the local store other than through the
//! store's verifying writer.

use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::sync::{Arc, OnceLock};

use sha2::{Digest as _, Sha256};

use crate::backend::{CallError, Progress, StoredEntry};
use crate::domain::{Digest, Entry, Stored};
use crate::host_data;
use crate::local::store::BodyWriter;
use crate::trust::{Lookup, Trust};

/// The largest body an entry may claim. Go outputs reach hundreds of MB; a
/// claim far beyond that is a broken backend, not a cache entry.
pub const MAX_BODY: u64 = 64 << 30;

/// Bodies smaller than this go as they are: compressing them saves less than
/// the bytes of the record that would say so.
const MIN_TO_COMPRESS: u64 = 512;
/// A compressed body is kept in memory up to this size, beyond in a file.
const SPOOL_IN_MEMORY: usize = 8 << 20;

/// Whether and how bodies going to the backend are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    /// zstd at this level.
    Zstd(i32),
}

/// Why a body coming in was refused, once it was: set by the sink, read by
/// whoever handed the sink to the backend (the backend's call may well fail
/// because of it, and that failure is not the backend's outage).
#[derive(Clone, Default)]
pub struct Refusal(Arc<OnceLock<String>>);

impl Refusal {
    pub fn reason(&self) -> Option<&str> {
        self.0.get().map(String::as_str)
    }

    fn refuse(&self, why: String) -> io::Error {
        let _ = self.0.set(why);
        io::Error::other(self.0.get().cloned().unwrap_or_default())
    }
}

/// A writer that refuses to take more than `limit` bytes.
struct Held<W> {
    inner: W,
    limit: u64,
    written: u64,
    refusal: Refusal,
    what: &'static str,
}

impl<W: Write> Write for Held<W> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        if self.written + bytes.len() as u64 > self.limit {
            return Err(self.refusal.refuse(format!("{} more than the {} bytes it should be", self.what, self.limit)));
        }
        let n = self.inner.write(bytes)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

enum Target {
    AsIs(Held<BodyWriter>),
    Zstd(zstd::stream::write::Decoder<'static, Held<BodyWriter>>),
}

/// Where a backend writes a body it supplies.
pub struct BodySink {
    /// Boxed: the writer holds the hash state, and a sink travels by value.
    target: Box<Held<Target>>,
    progress: Progress,
    refusal: Refusal,
}

/// The way in for the body of `entry`, stored as `stored`, into the store's
/// `writer`, its bytes counted into `progress`; and what will say why, if it
/// is refused. Fails only if zstd cannot start (out of memory).
pub fn body_in(
    writer: BodyWriter,
    entry: &Entry,
    stored: &Stored,
    progress: &Progress,
) -> io::Result<(BodySink, Refusal)> {
    let refusal = Refusal::default();
    let decompressed =
        Held { inner: writer, limit: entry.size, written: 0, refusal: refusal.clone(), what: "the body is" };
    let (target, stored_size) = match stored {
        Stored::AsIs | Stored::Inline { compressed: false, .. } => (Target::AsIs(decompressed), entry.size),
        Stored::Zstd { size, .. } => (Target::Zstd(zstd::stream::write::Decoder::new(decompressed)?), *size),
        Stored::Inline { bytes, compressed: true } => {
            (Target::Zstd(zstd::stream::write::Decoder::new(decompressed)?), bytes.len() as u64)
        }
    };
    let target = Box::new(Held {
        inner: target,
        limit: stored_size,
        written: 0,
        refusal: refusal.clone(),
        what: "the backend wrote",
    });
    Ok((BodySink { target, progress: progress.clone(), refusal: refusal.clone() }, refusal))
}

/// The body carried in the entry `stored` describes, through a sink made
/// for it by [`body_in`]: the same checks as a body a backend writes.
pub fn inline_in(mut sink: BodySink, stored: &Stored) -> Result<BodyWriter, String> {
    let Stored::Inline { bytes, .. } = stored else { return Err("no body is carried in this entry".into()) };
    // A refusal is kept by the sink, and said by `finish`.
    let _ = sink.write_all(bytes);
    sink.finish()
}

impl BodySink {
    /// The store's writer, holding the whole body, for the store to verify and
    /// keep; or why the body was refused.
    pub fn finish(self) -> Result<BodyWriter, String> {
        if let Some(why) = self.refusal.reason() {
            return Err(why.to_string());
        }
        match self.target.inner {
            Target::AsIs(held) => Ok(held.inner),
            Target::Zstd(mut decoder) => match decoder.flush() {
                Ok(()) => Ok(decoder.into_inner().inner),
                Err(e) => {
                    let why = format!("the body did not decompress: {e}");
                    let _ = self.refusal.refuse(why.clone());
                    Err(why)
                }
            },
        }
    }

    /// Bytes the backend wrote, as it stores them.
    pub fn received(&self) -> u64 {
        self.target.written
    }
}

impl Write for Target {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        match self {
            Target::AsIs(held) => held.write(bytes),
            Target::Zstd(decoder) => decoder.write(bytes),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Target::AsIs(held) => held.flush(),
            Target::Zstd(decoder) => decoder.flush(),
        }
    }
}

impl Write for BodySink {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        if let Some(why) = self.refusal.reason() {
            return Err(io::Error::other(why.to_string()));
        }
        self.progress.add(bytes.len());
        match self.target.write_all(bytes) {
            Ok(()) => Ok(bytes.len()),
            Err(e) => {
                // A refusal was recorded by the writer that refused; anything
                // else is the compressed stream's or the store's failure.
                let why = match self.refusal.reason() {
                    Some(why) => why.to_string(),
                    None if matches!(&self.target.inner, Target::Zstd(_)) => {
                        format!("the body did not decompress: {e}")
                    }
                    None => format!("storing the body: {e}"),
                };
                Err(self.refusal.refuse(why))
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.target.flush()
    }
}

/// Where a backend reads a body it is given.
pub struct BodySource {
    reader: Box<dyn Read + Send>,
    progress: Progress,
}

impl Read for BodySource {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.reader.read(buf)?;
        self.progress.add(n);
        Ok(n)
    }
}

/// The way out for the body of `entry`, read from its stored `file`:
/// compressed when that is asked and worth it, and carried in the entry
/// itself when `inline` allows and it is small enough. Says how it is stored,
/// with the bytes to send as a body (none for a body carried in its entry),
/// counted into `progress` as they are read.
pub fn body_out(
    mut file: File,
    entry: &Entry,
    compression: Compression,
    inline: bool,
    progress: &Progress,
) -> io::Result<(Stored, Option<BodySource>)> {
    let source = |reader| Some(BodySource { reader, progress: progress.clone() });
    let fits = |size: u64| inline && size <= host_data::MAX_INLINE as u64;
    let read_all = |reader: &mut dyn Read, size: u64| -> io::Result<Arc<[u8]>> {
        let mut bytes = Vec::with_capacity(size as usize);
        reader.take(size).read_to_end(&mut bytes)?;
        progress.add(bytes.len());
        Ok(Arc::from(bytes))
    };
    if let Compression::Zstd(level) = compression
        && entry.size >= MIN_TO_COMPRESS
    {
        let (id, size, mut compressed) = compress(&mut file, entry.size, level)?;
        // Kept only if it saves a tenth: otherwise every reader pays the
        // decompression for nothing.
        if size <= entry.size - entry.size / 10 {
            compressed.rewind()?;
            if fits(size) {
                let bytes = read_all(&mut compressed, size)?;
                return Ok((Stored::Inline { bytes, compressed: true }, None));
            }
            return Ok((Stored::Zstd { id, size }, source(Box::new(compressed))));
        }
        file.rewind()?;
    }
    if fits(entry.size) {
        let bytes = read_all(&mut file, entry.size)?;
        if bytes.len() as u64 == entry.size {
            return Ok((Stored::Inline { bytes, compressed: false }, None));
        }
        file.rewind()?;
    }
    Ok((Stored::AsIs, source(Box::new(file))))
}

/// The first `size` bytes of `file`, compressed: their hash, their size and
/// where they are.
fn compress(file: &mut File, size: u64, level: i32) -> io::Result<(Digest, u64, tempfile::SpooledTempFile)> {
    struct Hashing<W> {
        inner: W,
        hash: Sha256,
        len: u64,
    }
    impl<W: Write> Write for Hashing<W> {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            let n = self.inner.write(bytes)?;
            self.hash.update(&bytes[..n]);
            self.len += n as u64;
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            self.inner.flush()
        }
    }
    let out = Hashing { inner: tempfile::spooled_tempfile(SPOOL_IN_MEMORY), hash: Sha256::new(), len: 0 };
    let mut encoder = zstd::stream::write::Encoder::new(out, level)?;
    // The size in the frame lets a reader size its buffers; the checksum is
    // left out, since the host checks SHA-256 of every body anyway.
    encoder.set_pledged_src_size(Some(size))?;
    encoder.include_contentsize(true)?;
    encoder.include_checksum(false)?;
    io::copy(&mut Read::by_ref(file).take(size), &mut encoder)?;
    let out = encoder.finish()?;
    Ok((out.hash.finalize().into(), out.len, out.inner))
}

/// Why an entry from the backend is not used.
pub enum Refused {
    /// The backend answered nonsense.
    Broken(CallError),
    /// Not signed by the key it was looked up for.
    Untrusted,
    /// Its host data is in a format this version does not read (a newer
    /// gocp wrote it): a miss, and nobody's fault.
    Unreadable,
}

/// Where to look up the entry of `action_id`, in order.
pub fn entry_lookups<'a>(trust: &'a Trust, action_id: &Digest) -> Vec<Lookup<'a>> {
    trust.lookups(action_id)
}

/// An entry the backend returned for `lookup`, as the core may use it, and
/// how its body is stored.
pub fn entry_in(
    trust: &Trust,
    lookup: &Lookup<'_>,
    action_id: &Digest,
    stored: StoredEntry,
) -> Result<(Entry, Stored), Refused> {
    let StoredEntry { entry, host_data } = stored;
    if entry.size > MAX_BODY {
        return Err(Refused::Broken(CallError::Broken(format!("read-entry claims a body of {} bytes", entry.size))));
    }
    let parsed = host_data::decode(&host_data).map_err(|_| Refused::Unreadable)?;
    if !trust.accepts(lookup, action_id, &entry, &parsed) {
        return Err(Refused::Untrusted);
    }
    match &parsed.stored {
        Stored::Zstd { size, .. } if *size > MAX_BODY => {
            return Err(Refused::Broken(CallError::Broken(format!("an entry claims a stored body of {size} bytes"))));
        }
        Stored::Inline { bytes, compressed: false } if bytes.len() as u64 != entry.size => {
            return Err(Refused::Broken(CallError::Broken(format!(
                "an entry of a body of {} bytes carries {} bytes of it",
                entry.size,
                bytes.len()
            ))));
        }
        _ => {}
    }
    Ok((entry, parsed.stored))
}

/// The entry of `action_id`, whose body is `stored` so, as the backend is
/// given it, and under which key.
pub fn entry_out(trust: &Trust, action_id: &Digest, entry: &Entry, stored: &Stored) -> (Digest, StoredEntry) {
    let (key, host_data) = trust.seal(action_id, entry, host_data::encode(stored));
    (key, StoredEntry { entry: *entry, host_data })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host_data::MAX_INLINE;
    use crate::local::store::Store;

    fn sha(bytes: &[u8]) -> Digest {
        Sha256::digest(bytes).into()
    }

    fn entry_of(body: &[u8]) -> Entry {
        Entry { output_id: sha(body), size: body.len() as u64, put_time_ns: 1 }
    }

    #[test]
    fn a_body_is_held_to_its_size_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let progress = Progress::default();
        let entry = entry_of(b"abcd");
        let (mut sink, refusal) = body_in(store.begin().unwrap(), &entry, &Stored::AsIs, &progress).unwrap();
        sink.write_all(b"abc").unwrap();
        assert!(sink.write_all(b"de").is_err(), "one byte too many");
        assert!(sink.write_all(b"d").is_err(), "and nothing after that");
        assert_eq!(progress.moved(), 5, "what arrived before the refusal counts for time");
        assert!(sink.finish().is_err());
        assert!(refusal.reason().unwrap().contains("more than the 4 bytes"), "{:?}", refusal.reason());

        let (mut sink, refusal) = body_in(store.begin().unwrap(), &entry, &Stored::AsIs, &progress).unwrap();
        sink.write_all(b"abcd").unwrap();
        assert_eq!(sink.received(), 4);
        let writer = sink.finish().unwrap();
        assert!(refusal.reason().is_none());
        assert!(store.commit(writer, &entry.output_id, 4).is_ok());
    }

    /// A body as `body_out` sends it, and how it is stored.
    fn sent(body: &[u8], compression: Compression) -> (Stored, Vec<u8>) {
        sent_with(body, compression, false)
    }

    fn sent_with(body: &[u8], compression: Compression, inline: bool) -> (Stored, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("body");
        std::fs::write(&path, body).unwrap();
        let progress = Progress::default();
        let (stored, source) =
            body_out(File::open(&path).unwrap(), &entry_of(body), compression, inline, &progress).unwrap();
        let bytes = match (&stored, source) {
            (Stored::Inline { bytes, .. }, None) => bytes.to_vec(),
            (_, Some(mut source)) => {
                let mut bytes = Vec::new();
                source.read_to_end(&mut bytes).unwrap();
                bytes
            }
            (_, None) => panic!("{stored:?} has no bytes to send"),
        };
        assert_eq!(progress.moved(), bytes.len() as u64);
        (stored, bytes)
    }

    #[test]
    fn bodies_go_compressed_under_the_hash_of_what_is_sent_and_come_back_whole() {
        let body: Vec<u8> = (0..100_000u32).flat_map(|i| (i % 251).to_le_bytes()).collect();
        let (stored, bytes) = sent(&body, Compression::Zstd(3));
        assert_eq!(stored, Stored::Zstd { id: sha(&bytes), size: bytes.len() as u64 });
        assert!(bytes.len() < body.len() / 4, "{} bytes from {}", bytes.len(), body.len());
        assert_eq!(stored.key(&entry_of(&body)), Some((sha(&bytes), bytes.len() as u64)));

        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (mut sink, refusal) =
            body_in(store.begin().unwrap(), &entry_of(&body), &stored, &Progress::default()).unwrap();
        for chunk in bytes.chunks(1000) {
            sink.write_all(chunk).unwrap();
        }
        assert_eq!(sink.received(), bytes.len() as u64);
        let writer = sink.finish().unwrap();
        assert!(refusal.reason().is_none());
        let path = store.commit(writer, &sha(&body), body.len() as u64).unwrap();
        assert_eq!(std::fs::read(path).unwrap(), body);
    }

    #[test]
    fn what_compression_would_not_shrink_goes_as_it_is() {
        // xorshift: bytes with nothing for zstd to find.
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let random: Vec<u8> = (0..50_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect();
        let (stored, bytes) = sent(&random, Compression::Zstd(3));
        assert_eq!(stored, Stored::AsIs);
        assert!(bytes == random, "sent as it is");
        let tiny = b"tiny, and repetitive: tiny tiny tiny";
        assert_eq!(sent(tiny, Compression::Zstd(3)), (Stored::AsIs, tiny.to_vec()));
        let text = "go build output ".repeat(1000).into_bytes();
        let (stored, bytes) = sent(&text, Compression::None);
        assert!(stored == Stored::AsIs && bytes == text, "not compressed when not asked");
    }

    #[test]
    fn a_compressed_body_that_is_damaged_or_too_large_is_refused() {
        let body = "package main\n".repeat(5000).into_bytes();
        let (stored, bytes) = sent(&body, Compression::Zstd(3));
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let receive = |bytes: &[u8], entry: &Entry| {
            let (mut sink, refusal) = body_in(store.begin().unwrap(), entry, &stored, &Progress::default()).unwrap();
            let written = sink.write_all(bytes);
            let finished = sink.finish();
            (written.is_ok() && finished.is_ok(), refusal.reason().map(str::to_string))
        };
        let mut damaged = bytes.clone();
        damaged[bytes.len() / 2] ^= 0xff;
        damaged[4] ^= 0xff;
        let (ok, why) = receive(&damaged, &entry_of(&body));
        assert!(!ok && why.is_some(), "damaged: {why:?}");

        // The frame says more than the entry: never decompressed past it.
        let short = Entry { size: body.len() as u64 / 2, ..entry_of(&body) };
        let (ok, why) = receive(&bytes, &short);
        assert!(!ok, "a bomb is stopped at the entry's size");
        assert!(why.unwrap().contains("more than the"));

        let mut longer = bytes.clone();
        longer.push(0);
        let (ok, why) = receive(&longer, &entry_of(&body));
        assert!(!ok && why.unwrap().contains("backend wrote more"), "held to the stored size");
    }

    #[test]
    fn how_a_body_is_stored_travels_with_its_entry() {
        let trust = Trust::default();
        let lookup = &entry_lookups(&trust, &[3; 32])[0];
        let stored = Stored::Zstd { id: [4; 32], size: 77 };
        let (key, out) = entry_out(&trust, &[3; 32], &entry_of(b"x"), &stored);
        assert_eq!(key, [3; 32]);
        let Ok((entry, back)) = entry_in(&trust, lookup, &[3; 32], out) else { panic!("refused") };
        assert_eq!((entry, back), (entry_of(b"x"), stored));
        let unknown = StoredEntry { entry: entry_of(b"x"), host_data: vec![b'q', 0] };
        assert!(matches!(entry_in(&trust, lookup, &[3; 32], unknown), Err(Refused::Unreadable)));
    }

    /// The body carried in `out`, through `entry_in` and the stages, kept
    /// in a store: its bytes, or why not.
    fn received_inline(out: StoredEntry) -> Result<Vec<u8>, String> {
        let trust = Trust::default();
        let lookup = &entry_lookups(&trust, &[3; 32])[0];
        let Ok((entry, stored)) = entry_in(&trust, lookup, &[3; 32], out) else { return Err("refused".into()) };
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (sink, _) = body_in(store.begin().unwrap(), &entry, &stored, &Progress::default()).unwrap();
        let writer = inline_in(sink, &stored)?;
        let path = store.commit(writer, &entry.output_id, entry.size).map_err(|e| e.to_string())?;
        Ok(std::fs::read(path).unwrap())
    }

    #[test]
    fn small_bodies_travel_in_their_entries_and_come_back_whole() {
        let trust = Trust::default();
        let tiny = b"tiny, and repetitive: tiny tiny tiny".to_vec();
        let text = "package main // a Go source line\n".repeat(100).into_bytes();
        for (body, compressed) in [(&tiny, false), (&text, true)] {
            let (stored, bytes) = sent_with(body, Compression::Zstd(3), true);
            assert_eq!(stored, Stored::Inline { bytes: Arc::from(bytes), compressed });
            assert_eq!(stored.key(&entry_of(body)), None, "nothing is sent on its own");
            let (_, out) = entry_out(&trust, &[3; 32], &entry_of(body), &stored);
            assert!(out.host_data.len() <= 1024, "within the contract: {} bytes", out.host_data.len());
            assert_eq!(received_inline(out).as_ref(), Ok(body));
        }
        let (stored, _) = sent_with(&tiny, Compression::None, true);
        assert_eq!(stored, Stored::Inline { bytes: Arc::from(tiny.clone()), compressed: false });

        // Too large even compressed, or not allowed: sent as a body.
        let large: Vec<u8> = (0..5000u32).flat_map(|i| format!("{} ", i * 7919 % 10007).into_bytes()).collect();
        assert!(matches!(sent_with(&large, Compression::Zstd(3), true).0, Stored::Zstd { .. }));
        assert_eq!(sent_with(&vec![7; MAX_INLINE + 1], Compression::None, true).0, Stored::AsIs);
        assert_eq!(sent_with(&tiny, Compression::None, false).0, Stored::AsIs);
    }

    #[test]
    fn a_damaged_body_in_an_entry_is_never_kept() {
        let trust = Trust::default();
        let text = "package main // a Go source line\n".repeat(100).into_bytes();
        for body in [b"a small output".to_vec(), text] {
            let (stored, _) = sent_with(&body, Compression::Zstd(3), true);
            let (_, mut out) = entry_out(&trust, &[3; 32], &entry_of(&body), &stored);
            let last = out.host_data.len() - 1;
            out.host_data[last] ^= 0x20;
            let why = received_inline(out).unwrap_err();
            assert!(why.contains("hashes to") || why.contains("decompress"), "{why}");
        }
        // Raw bytes of another length than the entry's: the backend's nonsense.
        let stored = Stored::Inline { bytes: Arc::from(&b"abc"[..]), compressed: false };
        let (_, out) = entry_out(&trust, &[3; 32], &entry_of(b"abcd"), &stored);
        assert_eq!(received_inline(out), Err("refused".into()));
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
