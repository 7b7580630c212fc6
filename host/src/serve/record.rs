//! Having the backend record puts, in the background of answering them.
//!
//! A put is answered as soon as its body is in the local store; then the
//! thread that read it records it (the body first if the backend keeps
//! bodies and may not have it, then the entry), as long as fewer than half
//! the threads are recording. Beyond that it waits in a backlog that the
//! recording threads work through, so threads are always left to answer
//! gets. At the end of the session every thread helps empty the backlog.
//! Until the backend has a put, gets for its action are answered from it
//! (`local::LocalTier::find`).
//!
//! It owns the backlog and the count of recording threads. For a backend that
//! keeps only entries nothing is ever dropped; for one that keeps bodies the
//! backlog is bounded, and what does not fit is counted and said.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use super::request_log::Line;
use super::stages;
use super::workers::{Abandoned, Calls, Worker};
use super::{Problem, Session};
use crate::backend::{Digest, Entry, StoredEntry};
use crate::domain::Stored;

/// Puts waiting to be recorded, at most, for a backend that keeps bodies;
/// uploads that far behind would not finish within the drain timeout anyway.
/// A backend that keeps only entries records them as fast as a disk allows.
const MAX_BODY_BACKLOG: usize = 1 << 16;

/// A put answered to the go command, still to be recorded by the backend.
/// Its body stays in the local store for the whole session: no trim removes
/// what a running session stored (see `local::sessions`).
pub(super) struct Recording {
    pub action_id: Digest,
    pub entry: Entry,
    /// Its place among the session's puts, in the order they arrived.
    pub seq: u64,
}

/// Entry writes of one action never overlap, and never go back in time: a
/// put recorded late never replaces a later one. A thread finding another
/// writing the same action leaves its entry to that one, which writes the
/// latest it was left once its own write is done. Nobody waits, so a write
/// stuck in the backend holds up only its own action. Striped by action id.
struct Order {
    next: AtomicU64,
    stripes: Vec<Mutex<HashMap<Digest, Written>>>,
}

/// The latest put of an action given to the backend (or being given), and
/// the one left to write after it.
struct Written {
    seq: u64,
    busy: bool,
    next: Option<(u64, Digest, StoredEntry)>,
}

impl Order {
    fn stripe(&self, action_id: &Digest) -> &Mutex<HashMap<Digest, Written>> {
        &self.stripes[usize::from(action_id[0]) % self.stripes.len()]
    }
}

pub(super) struct Backlog {
    queue: Mutex<VecDeque<Recording>>,
    /// Threads recording now, at most `max_recording`.
    recording: AtomicUsize,
    max_recording: usize,
    /// Bounded only for a backend that keeps bodies.
    bounded: bool,
    order: Order,
}

impl Backlog {
    pub fn new(threads: usize, stores_bodies: bool) -> Backlog {
        Backlog {
            queue: Mutex::new(VecDeque::new()),
            recording: AtomicUsize::new(0),
            max_recording: (threads / 2).max(1),
            bounded: stores_bodies,
            order: Order { next: AtomicU64::new(0), stripes: (0..64).map(|_| Mutex::default()).collect() },
        }
    }

    /// The place of a put arriving now.
    pub fn next_seq(&self) -> u64 {
        self.order.next.fetch_add(1, Ordering::SeqCst)
    }

    /// Threads recording now.
    pub fn recording(&self) -> usize {
        self.recording.load(Ordering::SeqCst)
    }

    fn start_recording(&self) -> bool {
        self.recording
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < self.max_recording).then_some(n + 1))
            .is_ok()
    }

    fn stop_recording(&self) {
        self.recording.fetch_sub(1, Ordering::SeqCst);
    }

    fn pop(&self) -> Option<Recording> {
        self.queue.lock().unwrap().pop_front()
    }
}

/// Records a put now if fewer than half the threads are recording, else
/// queues it.
pub(super) fn record_or_queue(session: &Arc<Session>, worker: &mut Worker, put: Recording) -> Result<(), Abandoned> {
    let backlog = &session.backlog;
    if backlog.start_recording() {
        let recorded = record(session, worker, put);
        if recorded.is_err() {
            backlog.stop_recording();
        }
        recorded?;
        return work_through(session, worker);
    }
    {
        let mut queue = backlog.queue.lock().unwrap();
        if backlog.bounded && queue.len() >= MAX_BODY_BACKLOG {
            drop(queue);
            session.stats.puts_not_recorded.add(1);
            session.problems.report(
                Problem::Backend,
                format!("{MAX_BODY_BACKLOG} puts are waiting to be recorded; further ones stay on this machine only"),
            );
            session.local.forget_pending(&put.action_id, &put.entry);
            return Ok(());
        }
        queue.push_back(put);
    }
    // A recording thread may have stopped between the check and the push.
    if backlog.start_recording() {
        return work_through(session, worker);
    }
    Ok(())
}

/// Holding a recording slot: records queued puts until there are none, then
/// gives the slot back.
fn work_through(session: &Arc<Session>, worker: &mut Worker) -> Result<(), Abandoned> {
    let backlog = &session.backlog;
    loop {
        while let Some(next) = backlog.pop() {
            if let Err(abandoned) = record(session, worker, next) {
                backlog.stop_recording();
                return Err(abandoned);
            }
        }
        backlog.stop_recording();
        // Anything queued after the last pop was queued while this thread still
        // held its slot, and is seen here.
        if backlog.queue.lock().unwrap().is_empty() || !backlog.start_recording() {
            return Ok(());
        }
    }
}

/// At the end of the session every thread records what is left, whatever
/// the limit, within the drain timeout the workers enforce.
pub(super) fn drain(session: &Arc<Session>, worker: &mut Worker) -> Result<(), Abandoned> {
    while let Some(next) = session.backlog.pop() {
        record(session, worker, next)?;
    }
    Ok(())
}

/// Has the backend record one put.
fn record(session: &Arc<Session>, worker: &mut Worker, put: Recording) -> Result<(), Abandoned> {
    let Recording { action_id, entry, seq } = put;
    let on_stuck = {
        let session = session.clone();
        move || {
            session.backend_stuck();
            session.local.forget_pending(&action_id, &entry);
        }
    };
    let done = worker.work(on_stuck, |calls| {
        if let Some(calls) = calls {
            record_with(session, calls, &action_id, &entry, seq);
        }
    });
    session.local.forget_pending(&action_id, &entry);
    done
}

/// The body first (if the backend keeps bodies and may not have it yet, from
/// the local store, compressed if the session compresses), then the entry,
/// which says how the body is stored.
fn record_with(session: &Session, calls: &mut Calls<'_>, action_id: &Digest, entry: &Entry, seq: u64) {
    let started = Instant::now();
    let log = |result, sent| {
        if session.log.is_on() {
            let mut line = Line::new("record", action_id, result, started);
            (line.output, line.size, line.remote_bytes) = (Some(hex::encode(entry.output_id)), Some(entry.size), sent);
            session.log_line(&line);
        }
    };
    if !session.breaker.allows() {
        session.stats.local_only_puts.add(1);
        log("paused", 0);
        return;
    }
    // A later put of the same action wins: its body alone is worth sending.
    if !session.local.is_latest(action_id, entry) {
        log("skipped", 0);
        return;
    }
    let (stored, sent) = match session.known.get(&entry.output_id) {
        Some(stored) => (stored, 0),
        None if session.backend.stores_bodies() => match send_body(session, calls, entry) {
            Some(stored) => {
                let sent = stored.stored_size(entry);
                (stored, sent)
            }
            None => {
                log("failed", 0);
                return;
            }
        },
        None => (Stored::AsIs, 0),
    };

    let (mut at, mut sealed) = stages::entry_out(&session.trust, action_id, entry, &stored);
    let stripe = session.backlog.order.stripe(action_id);
    {
        let mut written = stripe.lock().unwrap();
        let w = written.entry(*action_id).or_insert(Written { seq, busy: false, next: None });
        if w.busy {
            if w.seq < seq && w.next.as_ref().is_none_or(|(later, ..)| *later < seq) {
                w.next = Some((seq, at, sealed));
            }
            // Written by the thread writing now, unless a later one comes.
            log("stored", sent);
            return;
        }
        if w.seq > seq {
            log("skipped", sent);
            return;
        }
        (w.seq, w.busy) = (seq, true);
    }
    let mut first = true;
    loop {
        let result = match calls.write_entry(&at, &sealed) {
            Ok(()) => {
                session.breaker.success();
                "stored"
            }
            Err(e) => {
                session.backend_failed(&e);
                "failed"
            }
        };
        if std::mem::take(&mut first) {
            log(result, sent);
        }
        let mut written = stripe.lock().unwrap();
        let w = written.get_mut(action_id).expect("marked busy by this thread");
        match w.next.take() {
            Some((later, next_at, next_sealed)) => (w.seq, at, sealed) = (later, next_at, next_sealed),
            None => {
                w.busy = false;
                return;
            }
        }
    }
}

/// Has the backend store the body of `entry`; how it is stored there, or
/// `None` if it is not.
pub(super) fn send_body(session: &Session, calls: &mut Calls<'_>, entry: &Entry) -> Option<Stored> {
    // Gone only if removed by hand: an entry without its body would be a
    // miss elsewhere anyway.
    let file = std::fs::File::open(session.local.store.path_of(&entry.output_id)).ok()?;
    let (stored, source) = match stages::body_out(file, entry, session.compression, session.inline, calls.progress()) {
        Ok(out) => out,
        Err(e) => {
            session.problems.report(Problem::Store, format!("local store: reading a body to send: {e}"));
            return None;
        }
    };
    // Carried in its entry, which goes next: nothing to send on its own.
    let (Some((id, size)), Some(source)) = (stored.key(entry), source) else {
        session.stats.inline_bodies.add(1);
        session.stats.remote_bytes_up.add(stored.stored_size(entry));
        return Some(stored);
    };
    if let Err(e) = calls.write_body(&id, size, source) {
        session.backend_failed(&e);
        return None;
    }
    session.stats.remote_bytes_up.add(size);
    session.known.insert(entry.output_id, &stored);
    Some(stored)
}
