//! Session manifests at work: finding the one a session starts with,
//! bringing what it lists into the local tier ahead of the go command, and
//! leaving one at close for the next machine (the format is `manifest`'s).
//!
//! Each of a session's first distinct gets, once answered, looks for a
//! manifest under a key derived from it; the first one found queues what it
//! lists (those carried in it first), and keeps what it says of each action,
//! so that a get for a listed action needs no lookup of its own. After
//! answering a request, a thread takes a prefetching slot (as many threads as
//! leave two to read requests) and brings listed outputs in until the list is
//! done or the session ends: small ones from the manifest itself, the others
//! through the backend, each verified and stored like any fetched body. At close, after the backlog is recorded,
//! the reading thread stores the session's manifest as a body; then every
//! thread helps write a pointer entry to it under each of the session's first
//! gets' keys, so the go command waits one round trip for them, not sixteen.
//!
//! It owns the session's list, the queue and the prefetching slots. Only an
//! optimisation happens here: a failure is never reported as the build's
//! problem (the go command's own requests report a real outage), though the
//! breaker hears of outages.

use std::collections::{HashMap, VecDeque};
use std::fs;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

use super::get::{fetch, find_entry};
use super::record::send_body;
use super::stages;
use super::workers::{Abandoned, Calls, Worker};
use super::{Problem, Session};
use crate::domain::{Digest, Entry, Stored, now_ns};
use crate::local::store::CommitError;
use crate::manifest::{self, Item, Recorder};

pub(super) struct Prefetch {
    /// What this session used, for its manifest: only with a local tier of
    /// entries (a backend that keeps bodies elsewhere).
    recorder: Option<Recorder>,
    /// A manifest was found at the start of this session.
    found: AtomicBool,
    /// Looking for one failed: the other keys are not tried.
    given_up: AtomicBool,
    /// Actions a manifest listed, still to bring into the local tier.
    queue: Mutex<VecDeque<Item>>,
    /// What the manifest said each listed action produced, and how the
    /// backend stores its body: a get for one needs no lookup of its own.
    listed: Mutex<HashMap<Digest, (Entry, Option<Stored>)>>,
    /// Threads prefetching now, at most `max`, and never so many that fewer
    /// than two threads are left to read requests.
    prefetching: AtomicUsize,
    max: usize,
    /// The manifest's pointer entries at close.
    pointers: Pointers,
}

/// The pointer entries of the manifest left at close, which the threads
/// done recording write side by side.
#[derive(Default)]
struct Pointers {
    state: Mutex<PointerState>,
    changed: Condvar,
}

#[derive(Default)]
enum PointerState {
    /// The closing thread may still have some to write.
    #[default]
    Coming,
    /// Keys still to point at the manifest, stored as `stored`.
    Writing { entry: Entry, stored: Stored, keys: Vec<Digest> },
    /// None to write, or no more.
    Done,
}

impl Pointers {
    fn set(&self, state: PointerState) {
        *self.state.lock().unwrap() = state;
        self.changed.notify_all();
    }

    /// Waits until `until` while the closing thread may still have pointers
    /// to write; true if there are some.
    fn wait(&self, until: Instant) -> bool {
        let mut state = self.state.lock().unwrap();
        while let PointerState::Coming = *state {
            let Some(left) = until.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) else {
                return false;
            };
            state = self.changed.wait_timeout(state, left).unwrap().0;
        }
        matches!(&*state, PointerState::Writing { keys, .. } if !keys.is_empty())
    }

    /// The next pointer to write, if any is left.
    fn next(&self) -> Option<(Digest, Entry, Stored)> {
        match &mut *self.state.lock().unwrap() {
            PointerState::Writing { entry, stored, keys } => keys.pop().map(|key| (key, *entry, stored.clone())),
            PointerState::Coming | PointerState::Done => None,
        }
    }
}

/// Held by the thread that read the session's end: until dropped, the other
/// threads may wait for pointers to write; then they stop waiting, whatever
/// became of the manifest.
pub(super) struct Closing<'a>(&'a Prefetch);

impl Drop for Closing<'_> {
    fn drop(&mut self) {
        let mut state = self.0.pointers.state.lock().unwrap();
        if matches!(*state, PointerState::Coming) {
            *state = PointerState::Done;
        }
        drop(state);
        self.0.pointers.changed.notify_all();
    }
}

impl Prefetch {
    pub fn new(enabled: bool, threads: usize) -> Prefetch {
        Prefetch {
            recorder: enabled.then(Recorder::default),
            found: AtomicBool::new(false),
            given_up: AtomicBool::new(false),
            queue: Mutex::new(VecDeque::new()),
            listed: Mutex::new(HashMap::new()),
            prefetching: AtomicUsize::new(0),
            // Fetching is waiting on the network, not work for the CPU: as
            // many as leave two threads to read requests.
            max: threads.saturating_sub(2),
            pointers: Pointers::default(),
        }
    }

    /// Called by the thread that read the session's end, before it records
    /// what is left.
    pub fn closing(&self) -> Closing<'_> {
        Closing(self)
    }

    /// The entry the manifest listed for `action_id`, and how its body is
    /// stored if it said.
    pub fn listed(&self, action_id: &Digest) -> Option<(Entry, Option<Stored>)> {
        self.listed.lock().unwrap().get(action_id).cloned()
    }

    /// Notes a get: true if it is one of the session's first, which may
    /// lead to a manifest not found yet.
    pub fn is_first_get(&self, action_id: &Digest) -> bool {
        self.recorder.as_ref().is_some_and(|r| r.get(action_id))
            && !self.found.load(Ordering::SeqCst)
            && !self.given_up.load(Ordering::SeqCst)
    }

    /// Notes an action answered with `entry`, for this session's manifest.
    pub fn note_used(&self, action_id: &Digest, entry: &Entry) {
        if let Some(r) = &self.recorder {
            r.used(action_id, entry);
        }
    }

    /// Notes a put, for this session's manifest.
    pub fn note_put(&self, action_id: &Digest, entry: &Entry) {
        if let Some(r) = &self.recorder {
            r.put(action_id, entry);
        }
    }

    fn start(&self, threads: usize, recording: usize) -> bool {
        self.prefetching
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                let busy = n + 1 + recording;
                (n < self.max && busy + 2 <= threads).then_some(n + 1)
            })
            .is_ok()
    }
}

/// Looks for the manifest an earlier session starting with `first_get`
/// left, and queues what it lists.
pub(super) fn look_for_manifest(
    session: &Arc<Session>,
    worker: &mut Worker,
    first_get: &Digest,
) -> Result<(), Abandoned> {
    if !session.breaker.allows() {
        return Ok(());
    }
    let key = manifest::pointer_key(first_get);
    let found = worker.work(session.on_stuck(), |calls| read_manifest(session, calls?, &key))?;
    let prefetch = &session.prefetch;
    if let Some(items) = found
        && !prefetch.found.swap(true, Ordering::SeqCst)
    {
        session.stats.manifest_items.add(items.len() as u64);
        prefetch.listed.lock().unwrap().extend(items.iter().map(|i| (i.action, (i.entry, i.stored.clone()))));
        // Those that cost no round trip first: the go command soon asks for
        // them, and they would otherwise wait behind fetches.
        let (inline, fetched): (Vec<Item>, Vec<Item>) = items.into_iter().partition(|i| i.body.is_some());
        prefetch.queue.lock().unwrap().extend(inline.into_iter().chain(fetched));
    }
    Ok(())
}

fn read_manifest(session: &Session, calls: &mut Calls<'_>, key: &Digest) -> Option<Vec<Item>> {
    // Found like any entry: where the trusted keys write, signed by them.
    let found = match find_entry(session, calls, key) {
        Ok(found) => found,
        // Only an optimisation failed: no line and no error count (the go
        // command's own requests report a real outage), but the breaker hears
        // of it, and no other key is tried, so a dead server costs one call.
        Err(e) => {
            if e.is_outage() {
                session.breaker.outage();
            }
            session.prefetch.given_up.store(true, Ordering::SeqCst);
            return None;
        }
    };
    // Nor does a lookup that worked tell the breaker anything: it is part of
    // a get whose own outcome counts (a backend whose entries answer and whose
    // bodies stall must still be paused).
    let (entry, stored) = found.filter(|(e, _)| e.size <= manifest::MAX_BYTES)?;
    let path = match session.local.body(&entry) {
        Some(path) => path,
        None => fetch(session, calls, &entry, &stored).ok()??,
    };
    session.known.insert(entry.output_id, &stored);
    // Verified by hash on the way in; anything else in it is not a manifest.
    manifest::decode(&fs::read(path).ok()?)
}

/// Takes a prefetching slot if there is something to prefetch and a slot to
/// spare, and fetches until the list is done or the session is over.
pub(super) fn run_if_due(session: &Arc<Session>, worker: &mut Worker) -> Result<(), Abandoned> {
    let prefetch = &session.prefetch;
    if prefetch.queue.lock().unwrap().is_empty() || !prefetch.start(session.threads, session.backlog.recording()) {
        return Ok(());
    }
    let result = loop {
        if session.end.is_over() {
            prefetch.queue.lock().unwrap().clear();
            break Ok(());
        }
        let Some(item) = prefetch.queue.lock().unwrap().pop_front() else { break Ok(()) };
        if let Err(abandoned) = bring_in(session, worker, item) {
            break Err(abandoned);
        }
    };
    prefetch.prefetching.fetch_sub(1, Ordering::SeqCst);
    result
}

/// Brings one listed action into the local tier, unless it is there already:
/// its body from the manifest if it came inline, else from the backend. A
/// body the backend no longer has is skipped: the manifest may be older than
/// the remote's eviction.
fn bring_in(session: &Arc<Session>, worker: &mut Worker, item: Item) -> Result<(), Abandoned> {
    let Item { action, entry, stored, body } = item;
    if session.local.body(&entry).is_some() {
        if !session.local.has_entry(&action) {
            session.remember(&action, &entry);
        }
        return Ok(());
    }
    if let Some(body) = body {
        match session.local.store.keep(&body, &entry.output_id) {
            Ok(_) => {
                session.stats.prefetched.add(1);
                session.remember(&action, &entry);
            }
            Err(CommitError::Io(e)) => session.problems.report(Problem::Store, format!("local store: {e}")),
            // Not what its entry says: never stored, and worth a line, since
            // something wrote a bad manifest; the backend's copy may still be good.
            Err(e) => {
                session.stats.rejected_bodies.add(1);
                session.problems.report(Problem::Backend, format!("rejected a body carried in a manifest: {e}"));
            }
        }
        return Ok(());
    }
    if !session.breaker.allows() {
        session.prefetch.queue.lock().unwrap().clear();
        return Ok(());
    }
    worker.work(session.on_stuck(), |calls| {
        let Some(calls) = calls else { return };
        // Listed without how its body is stored: its entry says.
        let stored = match stored {
            Some(stored) => stored,
            None => match find_entry(session, calls, &action) {
                Ok(Some((found, stored))) if found == entry => stored,
                _ => return,
            },
        };
        if let Ok(Some(_)) = fetch(session, calls, &entry, &stored) {
            session.stats.prefetched.add(1);
            session.remember(&action, &entry);
        }
    })
}

/// Leaves this session's manifest through the backend, for the next
/// machine: its body first, then a pointer from each of the session's first
/// gets, written side by side with the threads in [`help_at_close`].
pub(super) fn leave_manifest(session: &Arc<Session>, worker: &mut Worker) -> Result<(), Abandoned> {
    if session.breaker.paused() || session.read_only {
        return Ok(());
    }
    let found = session.prefetch.found.load(Ordering::SeqCst);
    let small_body = |entry: &Entry| fs::read(session.local.body(entry)?).ok();
    let stored_as = |entry: &Entry| session.known.get(&entry.output_id);
    let Some(to_write) = session.prefetch.recorder.as_ref().and_then(|r| r.finish(found, small_body, stored_as)) else {
        return Ok(());
    };
    let output_id: Digest = Sha256::digest(&to_write.bytes).into();
    // Through the local store like any body: bodies leave from stored files.
    if let Err(e) = session.local.store.keep(&to_write.bytes, &output_id) {
        session.problems.report(Problem::Store, format!("local store: keeping the session's manifest: {e}"));
        return Ok(());
    }
    let entry = Entry { output_id, size: to_write.bytes.len() as u64, put_time_ns: now_ns() };
    worker.work(session.on_stuck(), |calls| {
        let Some(calls) = calls else { return };
        let stored = match session.known.get(&output_id) {
            Some(stored) => stored,
            None => match send_body(session, calls, &entry) {
                Some(stored) => stored,
                None => return,
            },
        };
        session.prefetch.pointers.set(PointerState::Writing { entry, stored, keys: to_write.keys });
        write_pointers(session, calls);
    })
}

/// After recording what was left at the end of a session: writes pointers
/// to the manifest the closing thread is leaving, if it leaves one. Waits
/// for it at most as long as finishing a recording and sending the manifest
/// take (two calls); past that the closing thread writes them alone.
pub(super) fn help_at_close(session: &Arc<Session>, worker: &mut Worker) -> Result<(), Abandoned> {
    let until = Instant::now() + 2 * session.call_timeout + Duration::from_secs(1);
    if session.prefetch.recorder.is_none() || !session.prefetch.pointers.wait(until) {
        return Ok(());
    }
    worker.work(session.on_stuck(), |calls| {
        if let Some(calls) = calls {
            write_pointers(session, calls);
        }
    })
}

/// Writes pointers until none are left or one fails.
fn write_pointers(session: &Session, calls: &mut Calls<'_>) {
    while let Some(pointer) = session.prefetch.pointers.next() {
        if !write_pointer(session, calls, pointer) {
            return;
        }
    }
}

/// Writes one pointer; a failure ends the writing for every thread.
fn write_pointer(session: &Session, calls: &mut Calls<'_>, (key, entry, stored): (Digest, Entry, Stored)) -> bool {
    let (at, sealed) = stages::entry_out(&session.trust, &manifest::pointer_key(&key), &entry, &stored);
    match calls.write_entry(&at, &sealed) {
        Ok(()) => true,
        Err(e) => {
            session.prefetch.pointers.set(PointerState::Done);
            session.backend_failed(&e);
            false
        }
    }
}
