//! Answering a get.
//!
//! In order: a put of the same action still being recorded, or the local
//! tier when it has both the entry and the body, answers at once; a paused
//! backend makes it a miss; otherwise the thread's instance looks the action
//! up, and if its output is not on this machine and the backend keeps
//! bodies, brings the body in through the stages (verified before anything
//! else sees it) and keeps its entry locally, so it is fetched once. The
//! whole get is one outcome for the breaker. If a call gets stuck, the
//! watchdog answers the get as a miss.
//!
//! It never answers a get twice, and never serves a body the local store did
//! not verify.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::stages::{self, Refused};
use super::workers::{Abandoned, Calls, Worker};
use super::{Problem, Session, path_string, prefetch};
use crate::backend::{CallError, Digest, Entry, ReadBody};
use crate::local::store::CommitError;
use crate::protocol::{Response, format_time};

/// Answers a get, then, for one of the session's first gets, looks for the
/// manifest it may lead to.
pub(super) fn answer(session: &Arc<Session>, worker: &mut Worker, id: i64, action_id: Digest) -> Result<(), Abandoned> {
    let may_lead = session.prefetch.is_first_get(&action_id);
    respond(session, worker, id, action_id)?;
    if may_lead {
        prefetch::look_for_manifest(session, worker, &action_id)?;
    }
    Ok(())
}

fn respond(session: &Arc<Session>, worker: &mut Worker, id: i64, action_id: Digest) -> Result<(), Abandoned> {
    session.stats.gets.add(1);
    if let Some((entry, path)) = session.local.find(&action_id) {
        session.stats.hits_local.add(1);
        session.responder.send(&hit(session, id, &entry, path));
        session.prefetch.note_used(&action_id, &entry);
        return Ok(());
    }
    if !session.breaker.allows() {
        session.stats.skipped_while_paused.add(1);
        session.respond_miss(id);
        return Ok(());
    }
    // Answered here, or by the watchdog if a call gets stuck: the first to
    // claim the request answers it.
    let claimed = Arc::new(AtomicBool::new(false));
    let on_stuck = {
        let (session, claimed) = (session.clone(), claimed.clone());
        move || {
            session.backend_stuck();
            if !claimed.swap(true, Ordering::SeqCst) {
                session.respond_miss(id);
            }
        }
    };
    let found = worker.work(on_stuck, |calls| match calls {
        Some(calls) => look_up(session, calls, &action_id),
        None => {
            session.no_instance();
            None
        }
    })?;
    if !claimed.swap(true, Ordering::SeqCst) {
        match found {
            Some((entry, path)) => {
                session.responder.send(&hit(session, id, &entry, path));
                // After the answer: the go command needs only the body on disk.
                session.remember(&action_id, &entry);
                session.prefetch.note_used(&action_id, &entry);
            }
            None => session.respond_miss(id),
        }
    }
    Ok(())
}

/// The entry and the stored body for `action_id` through the backend, or
/// `None` for a miss. An entry that answers followed by a body that fails is
/// a failure: a backend whose bodies stall must be paused too.
fn look_up(session: &Session, calls: &mut Calls<'_>, action_id: &Digest) -> Option<(Entry, PathBuf)> {
    let entry = match find_entry(session, calls, action_id) {
        Ok(Some(entry)) => entry,
        Ok(None) => {
            session.breaker.success();
            return None;
        }
        Err(e) => {
            session.backend_failed(&e);
            return None;
        }
    };
    let path = match session.local.body(&entry) {
        Some(path) => Some(path),
        None if session.backend.stores_bodies() => match fetch(session, calls, &entry) {
            Ok(fetched) => {
                if fetched.is_some() {
                    session.stats.hits_fetched.add(1);
                    session.known.insert(entry.output_id);
                }
                fetched
            }
            Err(CallFailed) => return None,
        },
        None => None,
    };
    session.breaker.success();
    Some((entry, path?))
}

/// The entry of `action_id` the backend holds where the trusted keys write
/// it (see `stages::entry_lookups`), the first one that passes the stages.
/// An entry no trusted key signed counts as not found, and is counted.
pub(super) fn find_entry(
    session: &Session,
    calls: &mut Calls<'_>,
    action_id: &Digest,
) -> Result<Option<Entry>, CallError> {
    for lookup in stages::entry_lookups(&session.trust, action_id) {
        let Some(stored) = calls.read_entry(&lookup.key)? else { continue };
        match stages::entry_in(&session.trust, &lookup, action_id, stored) {
            Ok(entry) => return Ok(Some(entry)),
            Err(Refused::Untrusted) => session.untrusted(),
            Err(Refused::Broken(e)) => return Err(e),
        }
    }
    Ok(None)
}

fn hit(session: &Session, id: i64, entry: &Entry, path: PathBuf) -> Response {
    session.stats.hits.add(1);
    session.stats.hit_bytes.add(entry.size);
    Response {
        id,
        output_id: Some(entry.output_id),
        size: entry.size,
        time: Some(format_time(entry.put_time_ns)),
        disk_path: Some(path_string(path)),
        ..Default::default()
    }
}

/// A backend call failed; it has been counted and reported.
pub(super) struct CallFailed;

/// Brings a body the backend has into the local store, through the stages.
/// `Ok(None)` when it is not there to be had: the backend does not have it,
/// it was not what its entry says, or the local store failed (each reported
/// as it deserves).
pub(super) fn fetch(session: &Session, calls: &mut Calls<'_>, entry: &Entry) -> Result<Option<PathBuf>, CallFailed> {
    let writer = match session.local.store.begin() {
        Ok(w) => w,
        Err(e) => {
            session.problems.report(Problem::Store, format!("local store: {e}"));
            return Ok(None);
        }
    };
    let sink = stages::body_in(writer, entry.size, calls.progress());
    let written = match calls.read_body(&entry.output_id, entry.size, sink) {
        Ok(ReadBody::Written(sink)) => sink.finish(),
        Ok(ReadBody::NotFound) => return Ok(None),
        Err(e) => Err(e),
    };
    let writer = match written {
        Ok(writer) => writer,
        Err(e) => {
            session.backend_failed(&e);
            return Err(CallFailed);
        }
    };
    match session.local.store.commit(writer, &entry.output_id, entry.size) {
        Ok(path) => Ok(Some(path)),
        Err(CommitError::Io(e)) => {
            session.problems.report(Problem::Store, format!("local store: {e}"));
            Ok(None)
        }
        Err(e) => {
            session.stats.rejected_bodies.add(1);
            session.problems.report(Problem::Backend, format!("rejected a body from the plugin: {e}"));
            Ok(None)
        }
    }
}
