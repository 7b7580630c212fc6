//! Serving one go command: requests in, responses out, with the local store
//! and the plugin behind them.
//!
//! Every plugin thread runs the same loop: take the decoder, read the next
//! request (decoding a put's body straight into the store, since the go command
//! sends it in line), let go of the decoder, and answer the request with its
//! own plugin instance. So no request waits for a hand-off between threads,
//! which on a busy machine can cost more than the work itself; and a thread
//! stuck in a plugin call holds nothing, so the others keep reading while the
//! pool's watchdog answers for it. Each response is written by the thread that
//! has it (see `Responder`), in any order.
//!
//! A put is answered as soon as its body is stored locally; then the plugin
//! records it in the background: by the same thread if fewer than half the
//! instances are recording (uploading, for a remote plugin), else it waits in a
//! backlog (bounded; beyond it the put stays local only) that recording
//! threads work through, so that there are always threads left to answer gets. Until the plugin has recorded a put, gets for
//! that action are answered from the put itself, so a go command always reads
//! its own writes. When input ends (close, or end of file after `go list`),
//! every thread helps empty the backlog, each instance runs `finish`, the store
//! trims if due, and only then is close answered.
//!
//! For a plugin that keeps bodies elsewhere (a server, a shared directory),
//! the host keeps a local tier in front of it: entries are also recorded
//! locally (`local_entries`), and a get that finds both the entry and the body
//! locally never calls the plugin. A body the plugin supplies is verified,
//! stored locally and its entry recorded, so it is fetched once. Such a
//! session also leaves a manifest of what it used (see `manifest`); a later
//! session that starts with the same requests finds it, and threads not needed
//! for reading requests fetch what it lists into the local tier ahead of the
//! go command, so a warm build from a remote is not a chain of round trips.
//!
//! It owns the policy that no failure of the plugin, or of the disk, ever fails
//! a build: each becomes a miss, a local-only put, or a put error (only when
//! nothing could be stored). Repeated outages pause the plugin (see
//! `breaker`), and every request is answered exactly once. It must never write
//! to stdout except through its `Responder`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sha2::{Digest as _, Sha256};

use crate::breaker::Breaker;
use crate::local_entries::LocalEntries;
use crate::manifest::{self, Item, Recorder};
use crate::plugin::{Body, CallError, Entry, Instance, Plugin, Worker};
use crate::plugin::text;
use crate::protocol::{
    BodyError, Command, DecodeError, Decoder, Digest, KNOWN_COMMANDS, Response, UNCACHED_COMMANDS, format_time,
};
use crate::sessions;
use crate::stats::{Stats, Summary};
use crate::store::{CommitError, Store, TrimPolicy};

pub struct Settings {
    pub trim: TrimPolicy,
    /// The state directory, where running sessions are registered (see `sessions`).
    pub state_dir: PathBuf,
    /// How long the plugin threads may take, at the end, to finish the request
    /// in hand (recording the last puts) and run `finish`.
    pub drain_timeout: Duration,
}

/// How a session ended.
#[derive(Debug)]
pub enum Ending {
    /// The go command sent close (and got its reply).
    Closed,
    /// Input ended without close, as it does after `go list`.
    EndOfInput,
    /// The input broke the protocol; the stream cannot be followed further.
    BadInput(DecodeError),
}

/// The end of the session, and the close request to answer if there was one.
type End = (Ending, Option<i64>);

/// What the threads share.
struct Shared {
    store: Store,
    stats: Stats,
    problems: Problems,
    stores_bodies: bool,
    responder: Responder,
    /// Held by the thread reading the next request (and its body).
    decoder: Mutex<Decoder<BufReader<File>>>,
    /// Puts answered but not yet recorded by the plugin.
    pending: Mutex<HashMap<Digest, Entry>>,
    /// The local tier's entries, for plugins that keep bodies elsewhere.
    local: Option<LocalEntries>,
    /// Puts waiting for a thread to record them.
    backlog: Mutex<VecDeque<Recording>>,
    /// Threads recording puts now, at most `max_recording`.
    recording: AtomicUsize,
    max_recording: usize,
    /// Bodies the plugin is known to have (stored or supplied this session):
    /// not sent to it again.
    plugin_has: Mutex<HashSet<Digest>>,
    /// What this session used, for its manifest: only with a local tier.
    manifest: Option<Recorder>,
    /// A manifest was found at the start of this session.
    manifest_found: AtomicBool,
    /// Looking for one failed: the other keys are not tried.
    manifest_given_up: AtomicBool,
    /// Actions a manifest listed, still to bring into the local tier.
    prefetch: Mutex<VecDeque<Item>>,
    /// Threads prefetching now, at most `max_prefetching`, and never so many
    /// that fewer than two threads are left to read requests.
    prefetching: AtomicUsize,
    max_prefetching: usize,
    instances: usize,
    breaker: Breaker,
    /// Set by the thread that reads the end of the session.
    over: AtomicBool,
    end: Mutex<Option<End>>,
    ended: Condvar,
}

/// The largest body a plugin may claim. Go outputs reach hundreds of MB; a
/// claim far beyond that is a broken plugin, not a cache entry.
const MAX_PLUGIN_BODY: u64 = 64 << 30;

/// Puts waiting to be recorded, at most, for a plugin that keeps bodies;
/// beyond, a put stays local only (counted, and said once). Uploads that far
/// behind would not finish within the drain timeout anyway. A plugin that
/// keeps only entries records them as fast as a disk allows, and nothing is
/// ever dropped for it.
const MAX_BODY_BACKLOG: usize = 1 << 16;

/// Serves one go command until it closes (or input ends or breaks), and
/// hands `report` the session's figures just before answering close.
pub fn serve(
    plugin: Plugin,
    store: Store,
    local: Option<LocalEntries>,
    settings: Settings,
    input: File,
    output: File,
    report: &dyn Fn(&Summary),
) -> Ending {
    let started = Instant::now();
    let label = format!("{} {}", plugin.info.name, plugin.info.version);
    let max_recording = (plugin.instances() / 2).max(1);
    let manifest = local.as_ref().map(|_| Recorder::default());
    let shared = Arc::new(Shared {
        store,
        stats: Stats::default(),
        problems: Problems::new(&plugin.info.name),
        stores_bodies: plugin.capabilities.stores_bodies,
        responder: Responder::new(output),
        decoder: Mutex::new(Decoder::new(BufReader::with_capacity(256 * 1024, input))),
        pending: Mutex::new(HashMap::new()),
        local,
        backlog: Mutex::new(VecDeque::new()),
        recording: AtomicUsize::new(0),
        max_recording,
        plugin_has: Mutex::new(HashSet::new()),
        manifest,
        manifest_found: AtomicBool::new(false),
        manifest_given_up: AtomicBool::new(false),
        prefetch: Mutex::new(VecDeque::new()),
        prefetching: AtomicUsize::new(0),
        max_prefetching: plugin.instances() / 2,
        instances: plugin.instances(),
        breaker: Breaker::default(),
        over: AtomicBool::new(false),
        end: Mutex::new(None),
        ended: Condvar::new(),
    });
    shared.respond(Response::capabilities(KNOWN_COMMANDS));
    if let Some(why) = &plugin.unavailable {
        shared.breaker.hold();
        shared.problems.report(Problem::Plugin, format!("could not start: {why}"));
    }

    let body: Body = {
        let shared = shared.clone();
        Arc::new(move |worker: &mut Worker| serve_requests(&shared, worker))
    };
    let mut pool = plugin.run(body);
    let (ending, close_id) = {
        let mut end = shared.end.lock().unwrap();
        while end.is_none() {
            end = shared.ended.wait(end).unwrap();
        }
        end.take().expect("waited for it")
    };

    let shutdown = pool.wait(Instant::now() + settings.drain_timeout);
    if shutdown.unfinished > 0 {
        shared.problems.report(
            Problem::Plugin,
            format!("plugin did not finish within {:?}; some puts may not be recorded", settings.drain_timeout),
        );
    }
    for e in &shutdown.finish_errors {
        shared.problems.report(Problem::Plugin, format!("finishing: {e}"));
    }
    // After broken input the session is cut short: leave housekeeping to the next.
    if !matches!(ending, Ending::BadInput(_)) {
        match shared.store.trim(&settings.trim, sessions::oldest_running(&settings.state_dir)) {
            Ok(report) if report.ran => {
                if let Some(Err(e)) =
                    shared.local.as_ref().map(|l| l.trim(|e| shared.store.contains(&e.output_id, e.size)))
                {
                    shared.problems.report(Problem::Store, format!("trimming local entries: {e}"));
                }
            }
            Ok(_) => {}
            Err(e) => shared.problems.report(Problem::Store, format!("trimming the local store: {e}")),
        }
    }
    let summary = shared.stats.summary(
        &label,
        pool.busy(),
        started.elapsed(),
        &shutdown,
        shared.breaker.trips(),
        pool.network_denials(),
    );
    // Before the answer to close: once it has that, the go command kills its
    // helper (cmd/go cancels the command's context), so nothing after it is
    // sure to happen.
    report(&summary);
    if let Some(id) = close_id {
        // Never an error: cmd/go would fail a successful build over it.
        shared.respond(Response { id, ..Default::default() });
    }
    // The go command waits for end of file on our stdout before it exits.
    shared.responder.close();
    ending
}

/// What a thread does after reading a request.
enum Next {
    Get {
        id: i64,
        action_id: Digest,
    },
    Record(Recording),
    /// Answered already.
    Nothing,
}

/// A put answered to the go command, still to be recorded by the plugin. Its
/// body stays in the local store for the whole session: no trim removes what
/// a running session stored (see `sessions`).
struct Recording {
    action_id: Digest,
    entry: Entry,
}

/// The loop each plugin thread runs until the session is over.
fn serve_requests(shared: &Arc<Shared>, worker: &mut Worker) {
    loop {
        let next = {
            let mut decoder = shared.decoder.lock().unwrap();
            if shared.over.load(Ordering::SeqCst) {
                drop(decoder);
                drain_backlog(shared, worker);
                return;
            }
            match read_next(shared, &mut decoder) {
                Ok(next) => next,
                Err(end) => {
                    let closed = matches!(end.0, Ending::Closed);
                    shared.over.store(true, Ordering::SeqCst);
                    *shared.end.lock().unwrap() = Some(end);
                    shared.ended.notify_all();
                    drop(decoder);
                    drain_backlog(shared, worker);
                    // Only a session that ended as the go command meant it to:
                    // after `go list` (no close) the list is partial.
                    if closed {
                        write_manifest(shared, worker);
                    }
                    return;
                }
            }
        };
        let carry_on = match next {
            Next::Get { id, action_id } => get(shared, worker, id, action_id),
            Next::Record(recording) => record_or_queue(shared, worker, recording),
            Next::Nothing => true,
        } && prefetch_if_due(shared, worker);
        if !carry_on {
            // The watchdog gave up on this thread; a replacement reads on.
            return;
        }
    }
}

/// Reads the next request and does what needs no plugin. `Err` is the end.
fn read_next(shared: &Shared, decoder: &mut Decoder<BufReader<File>>) -> Result<Next, End> {
    let request = match decoder.next_request() {
        Ok(Some(r)) => r,
        Ok(None) => return Err((Ending::EndOfInput, None)),
        Err(e) => return Err((Ending::BadInput(e), None)),
    };
    match request.command {
        Command::Get { action_id } => Ok(Next::Get { id: request.id, action_id }),
        Command::Put { action_id, output_id, body_size } => {
            put(shared, decoder, request.id, action_id, output_id, body_size).map_err(|e| (Ending::BadInput(e), None))
        }
        Command::Close => Err((Ending::Closed, Some(request.id))),
        Command::Other(name) => {
            shared.respond(Response::error(request.id, format!("unknown command {name:?}")));
            Ok(Next::Nothing)
        }
    }
}

/// Serves a go command without a cache, when the local store cannot be used:
/// announces only `close`, so the build goes on, uncached.
pub fn serve_uncached(input: impl BufRead, output: File) -> Ending {
    let responder = Responder::new(output);
    let respond = |r: Response| responder.send(&r);
    respond(Response::capabilities(UNCACHED_COMMANDS));
    let mut decoder = Decoder::new(input);
    let ending = loop {
        match decoder.next_request() {
            Ok(None) => break Ending::EndOfInput,
            Err(e) => break Ending::BadInput(e),
            Ok(Some(request)) => match request.command {
                Command::Close => {
                    respond(Response { id: request.id, ..Default::default() });
                    break Ending::Closed;
                }
                // Not announced, so not expected; answered all the same.
                Command::Get { .. } => respond(Response::miss(request.id)),
                Command::Put { body_size, .. } => {
                    if let Err(e) = decoder.read_body(request.id, body_size, &mut io::sink()) {
                        break Ending::BadInput(e);
                    }
                    respond(Response::error(request.id, "gocp has no usable local store"));
                }
                Command::Other(name) => respond(Response::error(request.id, format!("unknown command {name:?}"))),
            },
        }
    };
    responder.close();
    ending
}

impl Shared {
    fn respond(&self, response: Response) {
        self.responder.send(&response);
    }
}

/// Answers a get, then, for one of the session's first gets, looks for the
/// manifest it may lead to. False if the watchdog gave up on this thread.
fn get(shared: &Arc<Shared>, worker: &mut Worker, id: i64, action_id: Digest) -> bool {
    let may_lead = shared.manifest.as_ref().is_some_and(|m| m.get(&action_id));
    if !answer_get(shared, worker, id, action_id) {
        return false;
    }
    if may_lead && !shared.manifest_found.load(Ordering::SeqCst) && !shared.manifest_given_up.load(Ordering::SeqCst) {
        return load_manifest(shared, worker, &action_id);
    }
    true
}

/// Answers a get; false if the watchdog gave up on this thread meanwhile.
fn answer_get(shared: &Arc<Shared>, worker: &mut Worker, id: i64, action_id: Digest) -> bool {
    Stats::add(&shared.stats.gets, 1);
    let pending = shared.pending.lock().unwrap().get(&action_id).copied();
    if let Some(entry) = pending.or_else(|| shared.local.as_ref().and_then(|l| l.read(&action_id)))
        && let Some(path) = shared.store.lookup(&entry.output_id, entry.size)
    {
        Stats::add(&shared.stats.hits_local, 1);
        shared.respond(hit(shared, id, &entry, path));
        shared.note_used(&action_id, &entry);
        return true;
    }
    if !shared.breaker.allows() {
        Stats::add(&shared.stats.skipped_while_paused, 1);
        shared.respond_miss(id);
        return true;
    }
    // Answered here, or by the watchdog if the call gets stuck: the first to
    // claim the request answers it.
    let claimed = Arc::new(AtomicBool::new(false));
    let on_stuck = {
        let (shared, claimed) = (shared.clone(), claimed.clone());
        move || {
            shared.plugin_stuck();
            if !claimed.swap(true, Ordering::SeqCst) {
                shared.respond_miss(id);
            }
        }
    };
    let response = worker.with_instance(on_stuck, |instance| match instance {
        Some(instance) => lookup(shared, instance, id, &action_id),
        None => {
            shared.problems.report(Problem::Plugin, "the plugin could not be started again".into());
            shared.breaker.outage();
            None
        }
    });
    let Some(response) = response else { return false };
    if !claimed.swap(true, Ordering::SeqCst) {
        match response {
            Some((r, entry)) => {
                shared.respond(r);
                // After the answer: the go command needs only the body on disk.
                shared.record_locally(&action_id, &entry);
                shared.note_used(&action_id, &entry);
            }
            None => shared.respond_miss(id),
        }
    }
    true
}

/// A hit's response and its entry, or `None` for a miss. The whole get is
/// one outcome for the breaker: an entry that answers followed by a body that
/// fails is a failure, or a backend whose bodies stall would never be paused.
fn lookup(shared: &Shared, instance: &mut Instance, id: i64, action_id: &Digest) -> Option<(Response, Entry)> {
    let entry = match instance.read_entry(action_id) {
        Ok(Some(entry)) if entry.size <= MAX_PLUGIN_BODY => entry,
        Ok(Some(entry)) => {
            shared.plugin_failed(&CallError::Broken(format!("read-entry claims a body of {} bytes", entry.size)));
            return None;
        }
        Ok(None) => {
            shared.breaker.success();
            return None;
        }
        Err(e) => {
            shared.plugin_failed(&e);
            return None;
        }
    };
    let path = match shared.store.lookup(&entry.output_id, entry.size) {
        Some(path) => path,
        None if shared.stores_bodies => match fetch(shared, instance, &entry) {
            Ok(Some(path)) => {
                Stats::add(&shared.stats.hits_fetched, 1);
                shared.plugin_has.lock().unwrap().insert(entry.output_id);
                path
            }
            Ok(None) => {
                shared.breaker.success();
                return None;
            }
            Err(CallFailed) => return None,
        },
        None => {
            shared.breaker.success();
            return None;
        }
    };
    shared.breaker.success();
    Some((hit(shared, id, &entry, path), entry))
}

fn hit(shared: &Shared, id: i64, entry: &Entry, path: PathBuf) -> Response {
    Stats::add(&shared.stats.hits, 1);
    Stats::add(&shared.stats.hit_bytes, entry.size);
    Response {
        id,
        output_id: Some(entry.output_id),
        size: entry.size,
        time: Some(format_time(entry.put_time_ns)),
        disk_path: Some(path_string(path)),
        ..Default::default()
    }
}

/// A plugin call failed; it has been counted and reported.
struct CallFailed;

/// Brings a body the plugin has into the local store, verified. `Ok(None)`
/// when it is not there to be had: the plugin does not have it, it was not
/// what its entry says, or the local store failed (each reported as it
/// deserves).
fn fetch(shared: &Shared, instance: &mut Instance, entry: &Entry) -> Result<Option<PathBuf>, CallFailed> {
    let writer = match shared.store.begin() {
        Ok(w) => w,
        Err(e) => {
            shared.problems.report(Problem::Store, format!("local store: {e}"));
            return Ok(None);
        }
    };
    let writer = match instance.read_body(&entry.output_id, entry.size, writer) {
        Ok(Ok(w)) => w,
        Ok(Err(())) => return Ok(None),
        Err(e) => {
            shared.plugin_failed(&e);
            return Err(CallFailed);
        }
    };
    match shared.store.commit(writer, &entry.output_id, entry.size) {
        Ok(path) => Ok(Some(path)),
        Err(CommitError::Io(e)) => {
            shared.problems.report(Problem::Store, format!("local store: {e}"));
            Ok(None)
        }
        Err(e) => {
            Stats::add(&shared.stats.rejected_bodies, 1);
            shared.problems.report(Problem::Plugin, format!("rejected a body from the plugin: {e}"));
            Ok(None)
        }
    }
}

/// Receives a put (its body into the store) and answers it; what is left
/// for the plugin to record, if anything.
fn put(
    shared: &Shared,
    decoder: &mut Decoder<BufReader<File>>,
    id: i64,
    action_id: Digest,
    output_id: Digest,
    size: u64,
) -> Result<Next, DecodeError> {
    Stats::add(&shared.stats.puts, 1);
    Stats::add(&shared.stats.put_bytes, size);
    let stored = match shared.store.lookup(&output_id, size) {
        // The same bytes are stored already (another action, or another go
        // command): read past the body without writing it again.
        Some(path) => match decoder.read_body(id, size, &mut io::sink())? {
            Ok(Ok(())) => {
                Stats::add(&shared.stats.puts_deduplicated, 1);
                Ok(path)
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(e.to_string()),
        },
        None => receive(shared, decoder, id, &output_id, size)?,
    };
    let path = match stored {
        Ok(path) => path,
        Err(message) => {
            Stats::add(&shared.stats.put_failures, 1);
            shared.respond(Response::error(id, message));
            return Ok(Next::Nothing);
        }
    };
    let entry = Entry { output_id, size, put_time_ns: now_ns() };
    shared.respond(Response { id, disk_path: Some(path_string(path)), ..Default::default() });
    shared.record_locally(&action_id, &entry);
    if let Some(m) = &shared.manifest {
        m.put(&action_id, &entry);
    }

    // Not `allows`: a probe is let through when the put is recorded.
    if shared.breaker.paused() {
        Stats::add(&shared.stats.local_only_puts, 1);
        return Ok(Next::Nothing);
    }
    shared.pending.lock().unwrap().insert(action_id, entry);
    Ok(Next::Record(Recording { action_id, entry }))
}

/// Records a put now if fewer than `max_recording` threads are recording,
/// else queues it; false if the watchdog gave up on this thread.
fn record_or_queue(shared: &Arc<Shared>, worker: &mut Worker, recording: Recording) -> bool {
    if shared.start_recording() {
        if !record(shared, worker, recording) {
            shared.recording.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        return work_through_backlog(shared, worker);
    }
    {
        let mut backlog = shared.backlog.lock().unwrap();
        if shared.stores_bodies && backlog.len() >= MAX_BODY_BACKLOG {
            drop(backlog);
            Stats::add(&shared.stats.puts_not_recorded, 1);
            shared.problems.report(
                Problem::Plugin,
                format!("{MAX_BODY_BACKLOG} puts are waiting to be recorded; further ones stay on this machine only"),
            );
            shared.forget_pending(&recording.action_id, &recording.entry);
            return true;
        }
        backlog.push_back(recording);
    }
    // A recording thread may have stopped between the check and the push.
    if shared.start_recording() {
        return work_through_backlog(shared, worker);
    }
    true
}

/// Holding a recording slot: records queued puts until there are none, then
/// gives the slot back. False if the watchdog gave up on this thread.
fn work_through_backlog(shared: &Arc<Shared>, worker: &mut Worker) -> bool {
    loop {
        loop {
            let Some(next) = shared.backlog.lock().unwrap().pop_front() else { break };
            if !record(shared, worker, next) {
                shared.recording.fetch_sub(1, Ordering::SeqCst);
                return false;
            }
        }
        shared.recording.fetch_sub(1, Ordering::SeqCst);
        // Anything queued after the last pop was queued while this thread still
        // held its slot, and is seen here.
        if shared.backlog.lock().unwrap().is_empty() || !shared.start_recording() {
            return true;
        }
    }
}

/// At the end of the session every thread records what is left, whatever the
/// limit, within the drain timeout the pool enforces.
fn drain_backlog(shared: &Arc<Shared>, worker: &mut Worker) {
    loop {
        let Some(next) = shared.backlog.lock().unwrap().pop_front() else { return };
        if !record(shared, worker, next) {
            return;
        }
    }
}

/// Has the plugin record a put; false if the watchdog gave up on this thread.
fn record(shared: &Arc<Shared>, worker: &mut Worker, recording: Recording) -> bool {
    let Recording { action_id, entry } = recording;
    let forget = {
        let shared = shared.clone();
        move || shared.forget_pending(&action_id, &entry)
    };
    let on_stuck = {
        let (shared, forget) = (shared.clone(), forget.clone());
        move || {
            shared.plugin_stuck();
            forget();
        }
    };
    let done = worker.with_instance(on_stuck, |instance| record_with(shared, instance, &action_id, &entry));
    forget();
    done.is_some()
}

/// The body first (if the plugin keeps bodies and may not have it yet, from
/// the local store), then the entry.
fn record_with(shared: &Shared, instance: Option<&mut Instance>, action_id: &Digest, entry: &Entry) {
    let Some(instance) = instance else { return };
    if !shared.breaker.allows() {
        Stats::add(&shared.stats.local_only_puts, 1);
        return;
    }
    // A later put of the same action, recorded by another thread, wins.
    if shared.pending.lock().unwrap().get(action_id).is_some_and(|latest| latest != entry) {
        return;
    }
    if shared.stores_bodies && !shared.plugin_has.lock().unwrap().contains(&entry.output_id) {
        // Gone only if removed by hand: an entry without its body would be a
        // miss elsewhere anyway.
        let Ok(file) = File::open(shared.store.path_of(&entry.output_id)) else { return };
        if let Err(e) = instance.write_body(&entry.output_id, entry.size, file) {
            shared.plugin_failed(&e);
            return;
        }
        shared.plugin_has.lock().unwrap().insert(entry.output_id);
    }
    record_entry(shared, instance, action_id, entry);
}

fn record_entry(shared: &Shared, instance: &mut Instance, action_id: &Digest, entry: &Entry) {
    match instance.write_entry(action_id, entry) {
        Ok(()) => shared.breaker.success(),
        Err(e) => shared.plugin_failed(&e),
    }
}

/// Decodes a put body into the local store. The outer error is a broken
/// stream; the inner one is this put's failure, answered to the go command.
fn receive(
    shared: &Shared,
    decoder: &mut Decoder<BufReader<File>>,
    id: i64,
    output_id: &Digest,
    size: u64,
) -> Result<Result<PathBuf, String>, DecodeError> {
    let mut writer = match shared.store.begin() {
        Ok(w) => w,
        Err(e) => {
            shared.problems.report(Problem::Store, format!("local store: {e}"));
            // The put fails either way; its body only has to be read past.
            let _ = decoder.read_body(id, size, &mut io::sink())?;
            return Ok(Err(format!("gocp local store: {e}")));
        }
    };
    match decoder.read_body(id, size, &mut writer)? {
        Ok(Ok(())) => {}
        Ok(Err(e @ (BodyError::InvalidBase64 | BodyError::SizeMismatch { .. }))) => return Ok(Err(e.to_string())),
        Err(e) => {
            shared.problems.report(Problem::Store, format!("local store: {e}"));
            return Ok(Err(format!("gocp local store: {e}")));
        }
    }
    Ok(match shared.store.commit(writer, output_id, size) {
        Ok(path) => Ok(path),
        Err(CommitError::Io(e)) => {
            shared.problems.report(Problem::Store, format!("local store: {e}"));
            Err(format!("gocp local store: {e}"))
        }
        Err(e) => Err(e.to_string()),
    })
}

/// Looks for the manifest an earlier session starting with `first_get` left,
/// and queues what it lists for prefetching. False if the watchdog gave up on
/// this thread.
fn load_manifest(shared: &Arc<Shared>, worker: &mut Worker, first_get: &Digest) -> bool {
    if !shared.breaker.allows() {
        return true;
    }
    let key = manifest::pointer_key(first_get);
    let Some(found) = worker.with_instance(stuck(shared), |instance| read_manifest(shared, instance?, &key)) else {
        return false;
    };
    if let Some(items) = found
        && !shared.manifest_found.swap(true, Ordering::SeqCst)
    {
        Stats::add(&shared.stats.manifest_items, items.len() as u64);
        shared.prefetch.lock().unwrap().extend(items);
    }
    true
}

fn read_manifest(shared: &Shared, instance: &mut Instance, key: &Digest) -> Option<Vec<Item>> {
    let found = match instance.read_entry(key) {
        Ok(found) => found,
        // Only an optimisation failed: no line and no error count (the go
        // command's own requests report a real outage), but the breaker hears
        // of it, and no other key is tried, so a dead server costs one call.
        Err(e) => {
            if e.is_outage() {
                shared.breaker.outage();
            }
            shared.manifest_given_up.store(true, Ordering::SeqCst);
            return None;
        }
    };
    // Nor does a lookup that worked tell the breaker anything: it is part of
    // a get whose own outcome counts (a backend whose entries answer and whose
    // bodies stall must still be paused).
    let entry = found.filter(|e| e.size <= manifest::MAX_BYTES)?;
    let path = match shared.store.lookup(&entry.output_id, entry.size) {
        Some(path) => path,
        None => fetch(shared, instance, &entry).ok()??,
    };
    shared.plugin_has.lock().unwrap().insert(entry.output_id);
    // Verified by hash on the way in; anything else in it is not a manifest.
    manifest::decode(&fs::read(path).ok()?)
}

/// Takes a prefetching slot if there is something to prefetch and a slot to
/// spare, and fetches until the list is done or the session is over. False if
/// the watchdog gave up on this thread.
fn prefetch_if_due(shared: &Arc<Shared>, worker: &mut Worker) -> bool {
    if shared.prefetch.lock().unwrap().is_empty() || !shared.start_prefetching() {
        return true;
    }
    let carry_on = loop {
        if shared.over.load(Ordering::SeqCst) {
            shared.prefetch.lock().unwrap().clear();
            break true;
        }
        let Some(item) = shared.prefetch.lock().unwrap().pop_front() else { break true };
        if !prefetch(shared, worker, item) {
            break false;
        }
    };
    shared.prefetching.fetch_sub(1, Ordering::SeqCst);
    carry_on
}

/// Brings one listed action into the local tier, unless it is there already:
/// its body from the manifest if it came inline, else from the plugin. A body
/// the plugin no longer has is skipped: the manifest may be older than the
/// remote's eviction. False if the watchdog gave up on this thread.
fn prefetch(shared: &Arc<Shared>, worker: &mut Worker, item: Item) -> bool {
    let Some(local) = shared.local.as_ref() else { return true };
    let Item { action, entry, body } = item;
    let (action_id, entry) = (&action, &entry);
    if shared.store.lookup(&entry.output_id, entry.size).is_some() {
        if local.read(action_id).is_none() {
            shared.record_locally(action_id, entry);
        }
        return true;
    }
    if let Some(body) = body {
        match store_bytes(shared, &body, &entry.output_id) {
            Ok(_) => {
                Stats::add(&shared.stats.prefetched, 1);
                shared.record_locally(action_id, entry);
            }
            Err(CommitError::Io(e)) => shared.problems.report(Problem::Store, format!("local store: {e}")),
            // Not what its entry says: never stored, and worth a line, since
            // something wrote a bad manifest; the plugin's copy may still be good.
            Err(e) => {
                Stats::add(&shared.stats.rejected_bodies, 1);
                shared.problems.report(Problem::Plugin, format!("rejected a body carried in a manifest: {e}"));
            }
        }
        return true;
    }
    if !shared.breaker.allows() {
        shared.prefetch.lock().unwrap().clear();
        return true;
    }
    worker
        .with_instance(stuck(shared), |instance| {
            if let Some(instance) = instance
                && let Ok(Some(_)) = fetch(shared, instance, entry)
            {
                Stats::add(&shared.stats.prefetched, 1);
                shared.plugin_has.lock().unwrap().insert(entry.output_id);
                shared.record_locally(action_id, entry);
            }
        })
        .is_some()
}

/// Leaves this session's manifest through the plugin, for the next machine:
/// its body first, then a pointer from each of the session's first gets.
fn write_manifest(shared: &Arc<Shared>, worker: &mut Worker) {
    if shared.breaker.paused() {
        return;
    }
    let found = shared.manifest_found.load(Ordering::SeqCst);
    let small_body = |entry: &Entry| fs::read(shared.store.lookup(&entry.output_id, entry.size)?).ok();
    let Some(to_write) = shared.manifest.as_ref().and_then(|m| m.finish(found, small_body)) else { return };
    let output_id: Digest = Sha256::digest(&to_write.bytes).into();
    let size = to_write.bytes.len() as u64;
    // Through the local store like any body: the plugin reads bodies from files.
    let stored = store_bytes(shared, &to_write.bytes, &output_id);
    let file = match stored.map_err(|e| e.to_string()).and_then(|path| File::open(path).map_err(|e| e.to_string())) {
        Ok(file) => file,
        Err(e) => {
            shared.problems.report(Problem::Store, format!("local store: keeping the session's manifest: {e}"));
            return;
        }
    };
    let entry = Entry { output_id, size, put_time_ns: now_ns() };
    worker.with_instance(stuck(shared), |instance| {
        let Some(instance) = instance else { return };
        if !shared.plugin_has.lock().unwrap().contains(&output_id)
            && let Err(e) = instance.write_body(&output_id, size, file)
        {
            shared.plugin_failed(&e);
            return;
        }
        for key in &to_write.keys {
            if let Err(e) = instance.write_entry(&manifest::pointer_key(key), &entry) {
                shared.plugin_failed(&e);
                return;
            }
        }
    });
}

/// What the watchdog does for background work stuck in the plugin: there is
/// no request to answer, only the outage to note.
fn stuck(shared: &Arc<Shared>) -> impl FnOnce() + Send + 'static {
    let shared = shared.clone();
    move || shared.plugin_stuck()
}

/// Stores `bytes` as the body of `output_id`, verified like any other.
fn store_bytes(shared: &Shared, bytes: &[u8], output_id: &Digest) -> Result<PathBuf, CommitError> {
    let mut writer = shared.store.begin().map_err(CommitError::Io)?;
    writer.write_all(bytes).map_err(CommitError::Io)?;
    shared.store.commit(writer, output_id, bytes.len() as u64)
}

impl Shared {
    /// Drops a put from the pending map once the plugin has it (or never will),
    /// unless a later put of the same action replaced it meanwhile.
    fn forget_pending(&self, action_id: &Digest, entry: &Entry) {
        let mut pending = self.pending.lock().unwrap();
        if pending.get(action_id) == Some(entry) {
            pending.remove(action_id);
        }
    }

    fn note_used(&self, action_id: &Digest, entry: &Entry) {
        if let Some(m) = &self.manifest {
            m.used(action_id, entry);
        }
    }

    fn start_prefetching(&self) -> bool {
        self.prefetching
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                let busy = n + 1 + self.recording.load(Ordering::SeqCst);
                (n < self.max_prefetching && busy + 2 <= self.instances).then_some(n + 1)
            })
            .is_ok()
    }

    fn start_recording(&self) -> bool {
        self.recording
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < self.max_recording).then_some(n + 1))
            .is_ok()
    }

    /// Keeps an entry in the local tier, if there is one.
    fn record_locally(&self, action_id: &Digest, entry: &Entry) {
        if let Some(Err(e)) = self.local.as_ref().map(|l| l.write(action_id, entry)) {
            self.problems.report(Problem::Store, format!("local entries: {e}"));
        }
    }

    fn respond_miss(&self, id: i64) {
        Stats::add(&self.stats.misses, 1);
        self.respond(Response::miss(id));
    }

    fn plugin_failed(&self, e: &CallError) {
        match e {
            CallError::Trap(_) => Stats::add(&self.stats.plugin_traps, 1),
            CallError::Timeout(_) => Stats::add(&self.stats.plugin_timeouts, 1),
            CallError::Unavailable(_) | CallError::Broken(_) => Stats::add(&self.stats.plugin_errors, 1),
        }
        self.problems.report(Problem::Plugin, e.to_string());
        if e.is_outage() {
            self.breaker.outage();
        }
    }

    /// A call stuck beyond its deadline and out of reach of interruption.
    fn plugin_stuck(&self) {
        Stats::add(&self.stats.plugin_timeouts, 1);
        self.problems.report(Problem::Plugin, "a call hung past its deadline; its thread was given up".into());
        self.breaker.outage();
    }
}

fn path_string(path: PathBuf) -> String {
    // The state directory is checked to be UTF-8 at start-up, and the names
    // below it are hex.
    path.into_os_string().into_string().expect("store paths are UTF-8")
}

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// Sends responses to the go command. The thread that has a response writes
/// it to stdout itself: handing it to a writer thread would add a wake-up to
/// every request's latency. When several threads answer at once, the one
/// writing takes the others' responses along in its next write, so the rest
/// return at once and no line is ever split.
struct Responder {
    pending: Mutex<Pending>,
    /// None once closed, or once the go command stopped reading.
    out: Mutex<Option<File>>,
}

#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    /// A thread is writing; it will also write whatever is added meanwhile.
    writing: bool,
}

impl Responder {
    fn new(out: File) -> Responder {
        Responder { pending: Mutex::new(Pending::default()), out: Mutex::new(Some(out)) }
    }

    fn send(&self, response: &Response) {
        let mut pending = self.pending.lock().unwrap();
        response.encode(&mut pending.bytes);
        if pending.writing {
            return;
        }
        pending.writing = true;
        loop {
            let batch = std::mem::take(&mut pending.bytes);
            if batch.is_empty() {
                pending.writing = false;
                return;
            }
            drop(pending);
            let mut out = self.out.lock().unwrap();
            if let Some(file) = out.as_mut()
                && file.write_all(&batch).is_err()
            {
                // The go command is gone; nothing more can be delivered.
                *out = None;
            }
            drop(out);
            pending = self.pending.lock().unwrap();
        }
    }

    /// Closes stdout: the go command sees end of file. Later sends are dropped.
    fn close(&self) {
        self.out.lock().unwrap().take();
    }
}

/// The kinds of trouble worth one line on stderr.
#[derive(Clone, Copy)]
enum Problem {
    Plugin,
    Store,
}

/// Prints the first problem of each kind, once: stderr is the user's build
/// output, and a failing backend would otherwise print a line per request.
struct Problems {
    plugin_name: String,
    seen: [AtomicU64; 2],
}

impl Problems {
    fn new(plugin_name: &str) -> Self {
        Problems { plugin_name: plugin_name.to_string(), seen: Default::default() }
    }

    fn report(&self, kind: Problem, message: String) {
        if self.seen[kind as usize].fetch_add(1, Ordering::Relaxed) > 0 {
            return;
        }
        // Plugin text arrives sanitized; a trap's message (a backtrace with
        // the plugin's own function names) is made one safe line here.
        let message = text::one_line(&message);
        match kind {
            Problem::Plugin => eprintln!(
                "gocp: plugin {}: {message} (the build goes on without it; later errors are only counted)",
                self.plugin_name
            ),
            Problem::Store => eprintln!("gocp: {message} (the build goes on; later errors are only counted)"),
        }
    }
}
