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

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::stages;
use super::workers::{Abandoned, Calls, Worker};
use super::{Problem, Session};
use crate::backend::{Digest, Entry};

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
}

pub(super) struct Backlog {
    queue: Mutex<VecDeque<Recording>>,
    /// Threads recording now, at most `max_recording`.
    recording: AtomicUsize,
    max_recording: usize,
    /// Bounded only for a backend that keeps bodies.
    bounded: bool,
}

impl Backlog {
    pub fn new(threads: usize, stores_bodies: bool) -> Backlog {
        Backlog {
            queue: Mutex::new(VecDeque::new()),
            recording: AtomicUsize::new(0),
            max_recording: (threads / 2).max(1),
            bounded: stores_bodies,
        }
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
    let Recording { action_id, entry } = put;
    let on_stuck = {
        let session = session.clone();
        move || {
            session.backend_stuck();
            session.local.forget_pending(&action_id, &entry);
        }
    };
    let done = worker.work(on_stuck, |calls| {
        if let Some(calls) = calls {
            record_with(session, calls, &action_id, &entry);
        }
    });
    session.local.forget_pending(&action_id, &entry);
    done
}

/// The body first (if the backend keeps bodies and may not have it yet, from
/// the local store), then the entry.
fn record_with(session: &Session, calls: &mut Calls<'_>, action_id: &Digest, entry: &Entry) {
    if !session.breaker.allows() {
        session.stats.local_only_puts.add(1);
        return;
    }
    // A later put of the same action, recorded by another thread, wins.
    if !session.local.is_latest(action_id, entry) {
        return;
    }
    if session.backend.stores_bodies() && !session.known.contains(&entry.output_id) {
        // Gone only if removed by hand: an entry without its body would be a
        // miss elsewhere anyway.
        let Ok(file) = std::fs::File::open(session.local.store.path_of(&entry.output_id)) else { return };
        let source = stages::body_out(file, calls.progress());
        if let Err(e) = calls.write_body(&entry.output_id, entry.size, source) {
            session.backend_failed(&e);
            return;
        }
        session.known.insert(entry.output_id);
    }
    let (at, stored) = stages::entry_out(&session.trust, action_id, entry);
    match calls.write_entry(&at, &stored) {
        Ok(()) => session.breaker.success(),
        Err(e) => session.backend_failed(&e),
    }
}
