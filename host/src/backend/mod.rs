//! The seam between serving and storage: what the serving core asks of a
//! backend, and nothing about how a backend does it.
//!
//! A [`Backend`] starts [`Instance`]s; the serving core runs each on a thread
//! of its own, so calls into one instance never overlap. Every call carries
//! its [`Deadline`], which the core's watchdog enforces whatever the backend
//! does, and bodies cross as the core's own [`BodySink`] and [`BodySource`]
//! (see `serve::stages`), so a backend never touches the local store. The
//! plugin runtime implements this for WebAssembly components; the serving
//! core's tests implement it in process, to fail, hang or lie on demand.
//!
//! It must never know about the GOCACHEPROG protocol or about WebAssembly.

pub mod deadline;

use std::time::Duration;

pub use deadline::{Deadline, Progress};

pub use crate::domain::{Digest, Entry};
pub use crate::serve::stages::{BodySink, BodySource};

/// A backend call that did not succeed. `Trap` and `Timeout` mean the
/// instance can take no more calls and is replaced; the others are the
/// backend's own answers.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    #[error("backend broken: {0}")]
    Broken(String),
    #[error("plugin failed: {0:#}")]
    Trap(anyhow::Error),
    #[error("plugin call ran out of time after {:.1}s", .0.as_secs_f64())]
    Timeout(Duration),
}

impl CallError {
    /// Whether the failure says the backend cannot be reached or cannot cope,
    /// so that calling it again right away is likely to fail too.
    pub fn is_outage(&self) -> bool {
        matches!(self, CallError::Unavailable(_) | CallError::Trap(_) | CallError::Timeout(_))
    }

    /// Whether the instance that made the call can take no more.
    pub fn kills_instance(&self) -> bool {
        matches!(self, CallError::Trap(_) | CallError::Timeout(_))
    }
}

/// An entry as a backend keeps it: the entry, and the host's data stored
/// with it (a signature, see `serve::stages`), which the backend returns
/// exactly as it was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEntry {
    pub entry: Entry,
    pub host_data: Vec<u8>,
}

/// What asking for a body came to.
pub enum ReadBody {
    /// The backend wrote it into the sink, handed back for the core to check
    /// and keep.
    Written(BodySink),
    /// The backend does not have it.
    NotFound,
}

/// A kind of storage, configured and checked: what starts instances.
pub trait Backend: Send + Sync {
    /// Name and version, for messages and statistics ("disk 0.1.0").
    fn label(&self) -> &str;

    /// Its short name, for one-line reports ("disk").
    fn name(&self) -> &str;

    /// Whether it keeps bodies itself. If not, it keeps entries only, bodies
    /// stay in the local store, and `read_body` and `write_body` are never
    /// called.
    fn stores_bodies(&self) -> bool;

    /// How many instances may run at once.
    fn instances(&self) -> usize;

    /// Whether it keeps the host's data with entries (a plugin of an older
    /// contract does not, and cannot carry signatures).
    fn carries_host_data(&self) -> bool;

    /// Why it could not be started, when it could not (an outage at start,
    /// not a configuration mistake): the session then runs without it.
    fn unavailable(&self) -> Option<&str>;

    /// A fresh instance, ready for calls, started within `deadline`.
    fn start(&self, deadline: &Deadline) -> Result<Box<dyn Instance>, CallError>;

    /// What it did on the network so far, for statistics.
    fn network(&self) -> Network {
        Network::default()
    }
}

/// A backend's network figures.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    /// Connections it tried and was refused.
    pub denials: u64,
    /// HTTP connections opened, and requests sent over them.
    pub http_connections: u64,
    pub http_requests: u64,
}

/// One instance of a backend. Every call must return by its deadline or be
/// given up on; a backend that cannot stop a call itself is answered for by
/// the core's watchdog.
pub trait Instance: Send {
    /// The entry for `action_id`; `Ok(None)` is an ordinary miss.
    fn read_entry(&mut self, action_id: &Digest, deadline: &Deadline) -> Result<Option<StoredEntry>, CallError>;

    /// Writes the body of `output_id`, expected to be `size` bytes, into `sink`.
    fn read_body(
        &mut self,
        output_id: &Digest,
        size: u64,
        sink: BodySink,
        deadline: &Deadline,
    ) -> Result<ReadBody, CallError>;

    /// Stores a body of `size` bytes that hash to `output_id`, read from `source`.
    fn write_body(
        &mut self,
        output_id: &Digest,
        size: u64,
        source: BodySource,
        deadline: &Deadline,
    ) -> Result<(), CallError>;

    /// Stores (or replaces) the entry for `action_id`.
    fn write_entry(&mut self, action_id: &Digest, entry: &StoredEntry, deadline: &Deadline) -> Result<(), CallError>;

    /// The session is ending: flush and do housekeeping.
    fn finish(&mut self, deadline: &Deadline) -> Result<(), CallError>;
}
