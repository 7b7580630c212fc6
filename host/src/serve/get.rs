//! Answering a get.
//!
//! In order: a put of the same action still being recorded, or the local
//! tier when it has both the entry and the body, answers at once; a paused
//! backend makes it a miss; so does a streak of misses (`miss_streak`),
//! looking the action up afterwards; otherwise the thread's instance looks the action
//! up, and if its output is not on this machine and the backend keeps
//! bodies, brings the body in through the stages (verified before anything
//! else sees it) and keeps its entry locally, so it is fetched once. The
//! whole get is one outcome for the breaker. If a call gets stuck, the
//! watchdog answers the get as a miss.
//!
//! It never answers a get twice, and never serves a body the local store did
//! not verify.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use super::request_log::Line;
use super::stages::{self, Refused};
use super::workers::{Abandoned, Calls, Worker};
use super::{Problem, Session, path_string, prefetch};
use crate::backend::{CallError, Digest, Entry, ReadBody};
use crate::domain::Stored;
use crate::local::store::CommitError;
use crate::protocol::{Response, format_time};

/// Answers a get received at `received`, then, for one of the session's
/// first gets, looks for the manifest it may lead to.
pub(super) fn answer(
    session: &Arc<Session>,
    worker: &mut Worker,
    id: i64,
    action_id: Digest,
    received: Instant,
) -> Result<(), Abandoned> {
    let may_lead = session.prefetch.is_first_get(&action_id);
    respond(session, worker, id, action_id, received)?;
    if may_lead {
        prefetch::look_for_manifest(session, worker, &action_id)?;
    }
    Ok(())
}

/// What asking the backend came to.
enum Looked {
    /// Its body is in the local store; `fetched` says how many bytes came
    /// from the backend for it, if it was not here already.
    Hit { entry: Entry, path: PathBuf, fetched: Option<u64> },
    /// The backend has no (usable) entry, or no body for it.
    Miss,
    /// The backend failed; said and counted already.
    Failed,
}

fn respond(
    session: &Arc<Session>,
    worker: &mut Worker,
    id: i64,
    action_id: Digest,
    received: Instant,
) -> Result<(), Abandoned> {
    session.stats.gets.add(1);
    if let Some((entry, path)) = session.local.find(&action_id) {
        local_hit(session, id, &action_id, received, &entry, path);
        return Ok(());
    }
    // Listed by the session's manifest: its body may be here already (another
    // action's output, or brought in meanwhile), else it is fetched without a
    // lookup first.
    let listed = session.prefetch.listed(&action_id);
    if let Some((entry, _)) = listed
        && let Some(path) = session.local.body(&entry)
    {
        local_hit(session, id, &action_id, received, &entry, path);
        session.remember(&action_id, &entry);
        return Ok(());
    }
    let listed = listed.and_then(|(entry, stored)| Some((entry, stored?)));
    if !session.breaker.allows() {
        session.stats.skipped_while_paused.add(1);
        session.respond_miss(id);
        log(session, id, &action_id, received, None, "paused", 0);
        return Ok(());
    }
    if listed.is_none() && session.streak.answering_early() {
        return answer_early(session, worker, id, action_id, received);
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
                log(&session, id, &action_id, received, None, "failed", 0);
            }
        }
    };
    let asked = Instant::now();
    let looked = worker.work(on_stuck, |calls| match calls {
        Some(calls) => look_up(session, calls, &action_id, listed),
        None => {
            session.no_instance();
            Looked::Failed
        }
    })?;
    session.remote_wait_ns.fetch_add(asked.elapsed().as_nanos() as u64, Ordering::Relaxed);
    if !claimed.swap(true, Ordering::SeqCst) {
        match looked {
            Looked::Hit { entry, path, fetched } => {
                session.responder.send(&hit(session, id, &entry, path));
                // After the answer: the go command needs only the body on disk.
                session.remember(&action_id, &entry);
                session.prefetch.note_used(&action_id, &entry);
                let (from, bytes) = fetched.map_or(("remote", 0), |bytes| ("fetched", bytes));
                log(session, id, &action_id, received, Some(&entry), from, bytes);
            }
            Looked::Miss => {
                session.respond_miss(id);
                log(session, id, &action_id, received, None, "backend", 0);
            }
            Looked::Failed => {
                session.respond_miss(id);
                log(session, id, &action_id, received, None, "failed", 0);
            }
        }
    }
    Ok(())
}

/// Answers a get with a body this machine has.
fn local_hit(session: &Session, id: i64, action_id: &Digest, received: Instant, entry: &Entry, path: PathBuf) {
    session.stats.hits_local.add(1);
    session.responder.send(&hit(session, id, entry, path));
    session.prefetch.note_used(action_id, entry);
    log(session, id, action_id, received, Some(entry), "local", 0);
}

/// Answers a get as a miss at once (see `miss_streak`), then looks its
/// action up to learn whether the streak goes on. A body found is not
/// fetched: the go command is building it by now.
fn answer_early(
    session: &Arc<Session>,
    worker: &mut Worker,
    id: i64,
    action_id: Digest,
    received: Instant,
) -> Result<(), Abandoned> {
    session.stats.misses_early.add(1);
    session.respond_miss(id);
    log(session, id, &action_id, received, None, "early", 0);
    if !session.streak.look_up_early() {
        return Ok(());
    }
    worker.work(session.on_stuck(), |calls| {
        let Some(calls) = calls else { return session.no_instance() };
        match find_entry(session, calls, &action_id) {
            Ok(found) => {
                session.breaker.success();
                match found {
                    // The go command built it meanwhile, and the lookup found
                    // this session's own upload (a lookup waiting for a
                    // connection can come after it): no sign that the remote
                    // has the build.
                    Some(_) if session.local.find(&action_id).is_some() => {}
                    Some(_) => {
                        session.stats.misses_early_found.add(1);
                        session.streak.found();
                    }
                    None => session.streak.not_found(Duration::ZERO),
                }
            }
            Err(e) => session.backend_failed(&e),
        }
    })
}

/// A get's line in the request log: a hit when there is an entry.
fn log(
    session: &Session,
    id: i64,
    action_id: &Digest,
    received: Instant,
    entry: Option<&Entry>,
    from: &'static str,
    remote_bytes: u64,
) {
    if !session.log.is_on() {
        return;
    }
    let mut line = Line::new("get", action_id, if entry.is_some() { "hit" } else { "miss" }, received);
    line.id = Some(id);
    line.from = Some(from);
    line.output = entry.map(|e| hex::encode(e.output_id));
    line.size = entry.map(|e| e.size);
    line.remote_bytes = remote_bytes;
    session.log_line(&line);
}

/// The entry and the stored body for `action_id` through the backend (the
/// entry only if the manifest did not list it). An entry that answers
/// followed by a body that fails is a failure: a backend whose bodies stall
/// must be paused too.
fn look_up(session: &Session, calls: &mut Calls<'_>, action_id: &Digest, listed: Option<(Entry, Stored)>) -> Looked {
    let from_list = listed.is_some();
    let found = match listed {
        Some(listed) => Ok(Some(listed)),
        None => {
            let asked = Instant::now();
            let found = find_entry(session, calls, action_id);
            match found {
                Ok(Some(_)) => session.streak.found(),
                Ok(None) => session.streak.not_found(asked.elapsed()),
                Err(_) => {}
            }
            found
        }
    };
    let (entry, stored) = match found {
        Ok(Some(found)) => found,
        Ok(None) => {
            session.breaker.success();
            return Looked::Miss;
        }
        Err(e) => {
            session.backend_failed(&e);
            return Looked::Failed;
        }
    };
    let looked = match session.local.body(&entry) {
        Some(path) => Looked::Hit { entry, path, fetched: None },
        None if session.backend.stores_bodies() => match fetch(session, calls, &entry, &stored) {
            Ok(Some(path)) => {
                session.stats.hits_fetched.add(1);
                Looked::Hit { entry, path, fetched: Some(stored.stored_size(&entry)) }
            }
            // The list may be older than the entry (written since, with its
            // body stored another way): the entry says.
            Ok(None) if from_list => return look_up(session, calls, action_id, None),
            Ok(None) => Looked::Miss,
            Err(CallFailed) => return Looked::Failed,
        },
        None => Looked::Miss,
    };
    session.breaker.success();
    looked
}

/// The entry of `action_id` the backend holds where the trusted keys write
/// it (see `stages::entry_lookups`), the first one that passes the stages,
/// and how its body is stored. An entry no trusted key signed counts as not
/// found, and is counted.
pub(super) fn find_entry(
    session: &Session,
    calls: &mut Calls<'_>,
    action_id: &Digest,
) -> Result<Option<(Entry, Stored)>, CallError> {
    for lookup in stages::entry_lookups(&session.trust, action_id) {
        let Some(stored) = calls.read_entry(&lookup.key)? else { continue };
        match stages::entry_in(&session.trust, &lookup, action_id, stored) {
            Ok(found) => return Ok(Some(found)),
            Err(Refused::Untrusted) => session.untrusted(),
            Err(Refused::Unreadable) => {}
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

/// Brings a body the backend has, stored as `stored`, into the local store,
/// through the stages. `Ok(None)` when it is not there to be had: the
/// backend does not have it, it was not what its entry says, or the local
/// store failed (each reported as it deserves).
pub(super) fn fetch(
    session: &Session,
    calls: &mut Calls<'_>,
    entry: &Entry,
    stored: &Stored,
) -> Result<Option<PathBuf>, CallFailed> {
    let store_failed = |e: &dyn std::fmt::Display| {
        session.problems.report(Problem::Store, format!("local store: {e}"));
        Ok(None)
    };
    // Another thread fetching the same body (a get and the prefetcher, or
    // two actions with one output): wait for it rather than fetch it twice.
    let Some(_fetching) = session.fetches.claim(&entry.output_id) else {
        session.fetches.wait(&entry.output_id, session.call_timeout);
        return Ok(session.local.body(entry));
    };
    let (sink, refusal) =
        match session.local.store.begin().and_then(|w| stages::body_in(w, entry, stored, calls.progress())) {
            Ok(sink) => sink,
            Err(e) => return store_failed(&e),
        };
    let written = match stored.key(entry) {
        // Carried in its entry: through the same stages, with no call.
        None => stages::inline_in(sink, stored).map_err(CallError::Broken),
        Some((id, size)) => match calls.read_body(&id, size, sink) {
            Ok(ReadBody::Written(sink)) => {
                session.stats.remote_bytes_down.add(sink.received());
                sink.finish().map_err(CallError::Broken)
            }
            Ok(ReadBody::NotFound) => return Ok(None),
            Err(e) => Err(e),
        },
    };
    // A body refused on its way in is the body's fault, whatever the call
    // made of the refusal.
    if let Some(why) = refusal.reason() {
        return Ok(rejected(session, why));
    }
    let writer = match written {
        Ok(writer) => writer,
        Err(e) => {
            session.backend_failed(&e);
            return Err(CallFailed);
        }
    };
    match session.local.store.commit(writer, &entry.output_id, entry.size) {
        Ok(path) => {
            session.known.insert(entry.output_id, stored);
            Ok(Some(path))
        }
        Err(CommitError::Io(e)) => store_failed(&e),
        Err(e) => Ok(rejected(session, &e.to_string())),
    }
}

/// Bodies being fetched now, by output id.
#[derive(Default)]
pub(super) struct Fetches {
    now: Mutex<HashSet<Digest>>,
    done: Condvar,
}

/// A fetch claimed; released when dropped, however the fetch ends.
pub(super) struct Fetching<'a> {
    fetches: &'a Fetches,
    output_id: Digest,
}

impl Fetches {
    /// Claims the fetch of `output_id`; `None` if another thread has it.
    fn claim(&self, output_id: &Digest) -> Option<Fetching<'_>> {
        let claimed = self.now.lock().unwrap().insert(*output_id);
        claimed.then(|| Fetching { fetches: self, output_id: *output_id })
    }

    /// Waits until nobody is fetching `output_id`, at most `limit`.
    fn wait(&self, output_id: &Digest, limit: Duration) {
        let now = self.now.lock().unwrap();
        let _ = self.done.wait_timeout_while(now, limit, |now| now.contains(output_id));
    }
}

impl Drop for Fetching<'_> {
    fn drop(&mut self) {
        self.fetches.now.lock().unwrap().remove(&self.output_id);
        self.fetches.done.notify_all();
    }
}

fn rejected(session: &Session, why: &str) -> Option<PathBuf> {
    session.stats.rejected_bodies.add(1);
    session.problems.report(Problem::Backend, format!("rejected a body from the plugin: {why}"));
    None
}
