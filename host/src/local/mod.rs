//! The local tier: everything this machine keeps, in front of the backend.
//!
//! It owns the object store (the files the go command reads, `store`), the
//! entries kept here for a backend that keeps bodies elsewhere (`entries`),
//! the puts answered but not yet recorded by the backend, the register of
//! running sessions that trimming must spare (`sessions`), and trimming in a
//! process of its own (`trimmer`). A get that it can answer never reaches the
//! backend.
//!
//! It never calls the backend, and it never decides policy: when to ask the
//! backend, and what to do when it fails, is the serving core's.

pub mod entries;
pub mod sessions;
pub mod store;
pub mod trimmer;

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::domain::{Digest, Entry};
use entries::LocalEntries;
use store::{Store, TrimPolicy};

pub struct LocalTier {
    pub store: Store,
    /// Entries kept on this machine: only for a backend that keeps bodies
    /// elsewhere (a server, a shared directory).
    entries: Option<LocalEntries>,
    /// Puts answered to the go command and not yet recorded by the backend,
    /// so that a go command always reads its own writes.
    pending: Mutex<HashMap<Digest, Entry>>,
}

impl LocalTier {
    pub fn new(store: Store, entries: Option<LocalEntries>) -> LocalTier {
        LocalTier { store, entries, pending: Mutex::new(HashMap::new()) }
    }

    /// Whether this machine keeps entries of its own (see `entries`).
    pub fn keeps_entries(&self) -> bool {
        self.entries.is_some()
    }

    /// What this machine can answer for `action_id` by itself: a put still
    /// being recorded, or a local entry, whose body is stored here.
    pub fn find(&self, action_id: &Digest) -> Option<(Entry, PathBuf)> {
        let pending = self.pending.lock().unwrap().get(action_id).copied();
        let entry = pending.or_else(|| self.entries.as_ref()?.read(action_id))?;
        Some((entry, self.store.lookup(&entry.output_id, entry.size)?))
    }

    /// Whether `action_id` has an entry of its own here, whatever its body.
    pub fn has_entry(&self, action_id: &Digest) -> bool {
        self.entries.as_ref().is_some_and(|e| e.read(action_id).is_some())
    }

    /// The stored body of `entry`, if it is here (a use, for trimming).
    pub fn body(&self, entry: &Entry) -> Option<PathBuf> {
        self.store.lookup(&entry.output_id, entry.size)
    }

    /// Keeps `entry` for `action_id` on this machine, if it keeps entries.
    pub fn remember(&self, action_id: &Digest, entry: &Entry) -> io::Result<()> {
        match &self.entries {
            Some(e) => e.write(action_id, entry),
            None => Ok(()),
        }
    }

    /// Notes a put answered and not yet recorded by the backend.
    pub fn pend(&self, action_id: &Digest, entry: &Entry) {
        self.pending.lock().unwrap().insert(*action_id, *entry);
    }

    /// Whether `entry` is the latest put of `action_id` still waiting: a
    /// later one replaces it, and only that one is worth recording.
    pub fn is_latest(&self, action_id: &Digest, entry: &Entry) -> bool {
        self.pending.lock().unwrap().get(action_id).is_none_or(|latest| latest == entry)
    }

    /// Forgets a put once the backend has it (or never will), unless a later
    /// put of the same action replaced it meanwhile.
    pub fn forget_pending(&self, action_id: &Digest, entry: &Entry) {
        let mut pending = self.pending.lock().unwrap();
        if pending.get(action_id) == Some(entry) {
            pending.remove(action_id);
        }
    }

    /// Starts a trim of the store and the local entries in the background,
    /// if one is due (see `trimmer`). `Err` says what failed, for one line to
    /// the user.
    pub fn trim(&self, policy: &TrimPolicy, state_dir: &Path) -> Result<(), String> {
        match self.store.claim_trim(policy) {
            Ok(true) => trimmer::start(state_dir, policy),
            Ok(false) => Ok(()),
            Err(e) => Err(format!("trimming the local store: {e}")),
        }
    }
}
