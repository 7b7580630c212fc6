//! What every part of gocp speaks of: digests, entries and times.
//!
//! An action id names a build step, an output id names what it produced (the
//! SHA-256 of the output's bytes, its body), and an entry says which output an
//! action produced, how large and since when. The protocol, the local tier,
//! the backends and the manifests all use these same types; none of them
//! carries any behaviour here.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// A SHA-256 digest: an action id or an output id.
pub type Digest = [u8; 32];

/// What an action produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// SHA-256 of the body.
    pub output_id: Digest,
    /// The body's length in bytes.
    pub size: u64,
    /// When the entry was first stored, in nanoseconds since the Unix epoch:
    /// the go command expires cached test results by it.
    pub put_time_ns: u64,
}

/// Now, in nanoseconds since the Unix epoch (0 for a clock before it).
pub fn now_ns() -> u64 {
    nanos(SystemTime::now())
}

/// A time in nanoseconds since the Unix epoch (0 before it).
pub fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// How a backend holds an output's body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    /// As the go command wrote it, under its output id.
    AsIs,
    /// Compressed with zstd, under the SHA-256 of the compressed bytes (so
    /// that a store checking its keys against the content, as Bazel caches
    /// do, accepts it), `size` bytes long.
    Zstd { id: Digest, size: u64 },
    /// Not as a body at all: these bytes travel in the entry itself (its
    /// host data), zstd-compressed if `compressed`. Most of a Go build's
    /// outputs are this small, and each saves a body's round trip.
    Inline { bytes: Arc<[u8]>, compressed: bool },
}

impl Stored {
    /// The id and size the backend knows the body of `entry` by; none for a
    /// body carried in its entry.
    pub fn key(&self, entry: &Entry) -> Option<(Digest, u64)> {
        match self {
            Stored::AsIs => Some((entry.output_id, entry.size)),
            Stored::Zstd { id, size } => Some((*id, *size)),
            Stored::Inline { .. } => None,
        }
    }

    /// The bytes that travel for the body of `entry`, stored so.
    pub fn stored_size(&self, entry: &Entry) -> u64 {
        match self {
            Stored::AsIs => entry.size,
            Stored::Zstd { size, .. } => *size,
            Stored::Inline { bytes, .. } => bytes.len() as u64,
        }
    }
}
