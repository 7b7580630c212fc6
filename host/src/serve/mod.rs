//! Serving one go command: requests in, responses out, with the local tier
//! and the backend behind them.
//!
//! Every serving thread (`workers`) has its own backend instance and runs
//! the same loop: take the input, read the next request (decoding a put's
//! body straight into the local store, since the go command sends it in
//! line), let go of the input, and answer the request with its own instance.
//! So no request waits for a hand-off between threads, and a thread stuck in
//! a backend call holds nothing: the others read on while the watchdog
//! answers for it.
//!
//! Where each part of a session lives:
//! - `get`: answering a get, from the local tier or through the backend;
//! - `put`: receiving a put's body into the local store and answering it;
//! - `record`: having the backend record puts in the background, with a
//!   backlog, so threads are always left to answer gets;
//! - `prefetch`: finding the manifest a session starts with, bringing what it
//!   lists into the local tier, and leaving one at close;
//! - `stages`: what entries and bodies go through on their way between the
//!   local tier and the backend;
//! - `breaker`: pausing a backend that keeps failing;
//! - `miss_streak`: answering misses without waiting, while the backend has
//!   none of what the go command asks for;
//! - `workers`: the threads, their instances, deadlines and the watchdog;
//! - `responder` and `problems`: the go command's stdout and the user's stderr.
//!
//! It owns the policy that no failure of the backend, or of the disk, ever
//! fails a build: each becomes a miss, a local-only put, or a put error (only
//! when nothing could be stored), and every request is answered exactly once.
//! It must never write to stdout except through its `Responder`.

mod breaker;
mod get;
mod miss_streak;
mod prefetch;
mod problems;
mod put;
mod record;
pub mod request_log;
mod responder;
pub mod stages;
mod workers;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::backend::{Backend, CallError, Digest};
use crate::domain::Stored;
use crate::local::LocalTier;
use crate::local::store::TrimPolicy;
use crate::protocol::{Command, DecodeError, Decoder, KNOWN_COMMANDS, Response, UNCACHED_COMMANDS};
use crate::stats::{Stats, Summary};
use crate::trust::Trust;
use breaker::Breaker;
use problems::{Problem, Problems};
use request_log::{Line, RequestLog};
use responder::Responder;
use workers::{Abandoned, Worker, Workers};

pub use miss_streak::{DEFAULT as DEFAULT_MISS_STREAK, DEFAULT_WAIT as DEFAULT_MISS_WAIT};
pub use stages::Compression;
pub use workers::ShutdownReport;

pub struct Settings {
    pub trim: TrimPolicy,
    /// The state directory, where running sessions are registered (see
    /// `local::sessions`).
    pub state_dir: PathBuf,
    /// How long one backend call may take, before what its bytes earn.
    pub call_timeout: Duration,
    /// How long the threads may take, at the end, to finish the request in
    /// hand (recording the last puts) and run `finish`.
    pub drain_timeout: Duration,
    /// Give the backend nothing to write: every put stays on this machine.
    pub read_only: bool,
    /// Whose entries to use, and what to sign (see `trust`).
    pub trust: Trust,
    /// How bodies going to the backend are compressed.
    pub compression: Compression,
    /// Where to log each request, if anywhere.
    pub request_log: RequestLog,
    /// Lookups in a row not found after which gets are answered as misses
    /// before the backend answers (see `miss_streak`); 0: never.
    pub miss_streak: usize,
    /// Waiting on lookups in a row not found after which they are, too;
    /// zero: only the count starts a streak.
    pub miss_wait: Duration,
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

/// The input the go command writes, held by the thread reading a request.
type Input = Decoder<Box<dyn BufRead + Send>>;

/// What the serving threads share, each piece owned by the type named for it.
struct Session {
    local: LocalTier,
    backend: Arc<dyn Backend>,
    stats: Stats,
    problems: Problems,
    responder: Responder,
    input: Mutex<Input>,
    end: End,
    breaker: Breaker,
    backlog: record::Backlog,
    prefetch: prefetch::Prefetch,
    known: KnownBodies,
    fetches: get::Fetches,
    streak: miss_streak::MissStreak,
    /// How long one backend call may take, before what its bytes earn.
    call_timeout: Duration,
    /// Serving threads: what `record` and `prefetch` must leave free.
    threads: usize,
    read_only: bool,
    trust: Trust,
    compression: Compression,
    /// Whether small bodies travel inside their entries.
    inline: bool,
    /// Time gets spent waiting on the backend, summed finer than the
    /// milliseconds reported.
    remote_wait_ns: AtomicU64,
    log: RequestLog,
}

/// Serves one go command until it closes (or input ends or breaks), and
/// hands `report` the session's figures just before answering close.
pub fn serve(
    backend: Arc<dyn Backend>,
    local: LocalTier,
    settings: Settings,
    input: impl Read + Send + 'static,
    output: impl Write + Send + 'static,
    report: &dyn Fn(&Summary),
) -> Ending {
    let started = Instant::now();
    let threads = backend.instances();
    let prefetching = local.keeps_entries();
    // Only a backend that keeps host data can say a body is compressed.
    let compression = if backend.carries_host_data() { settings.compression } else { Compression::None };
    // Small bodies travel in their entries only where entries keep host
    // data, and bodies are the backend's to keep: a backend that leaves them
    // to the local store (the disk plugin in its default setup) has no round
    // trip to save.
    let inline = backend.carries_host_data() && backend.stores_bodies();
    let session = Arc::new(Session {
        stats: Stats::default(),
        problems: Problems::new(backend.name()),
        responder: Responder::new(Box::new(output)),
        input: Mutex::new(Decoder::new(Box::new(BufReader::with_capacity(256 * 1024, input)))),
        end: End::default(),
        breaker: Breaker::default(),
        backlog: record::Backlog::new(threads, backend.stores_bodies()),
        prefetch: prefetch::Prefetch::new(prefetching, threads),
        known: KnownBodies::default(),
        fetches: get::Fetches::default(),
        // Only a remote is worth not waiting for: one with a local tier.
        streak: miss_streak::MissStreak::new(if prefetching { settings.miss_streak } else { 0 }, settings.miss_wait),
        call_timeout: settings.call_timeout,
        local,
        backend,
        threads,
        read_only: settings.read_only,
        trust: settings.trust,
        compression,
        inline,
        remote_wait_ns: AtomicU64::new(0),
        log: settings.request_log,
    });
    session.responder.send(&Response::capabilities(KNOWN_COMMANDS));
    if let Some(why) = session.backend.unavailable() {
        session.breaker.hold();
        session.problems.report(Problem::Backend, format!("could not start: {why}"));
    }

    let body: workers::Body = {
        let session = session.clone();
        Arc::new(move |worker: &mut Worker| serve_requests(&session, worker))
    };
    let mut workers = Workers::start(session.backend.clone(), threads, settings.call_timeout, body);
    let (ending, close_id) = session.end.wait();

    let shutdown = workers.wait(Instant::now() + settings.drain_timeout);
    if shutdown.unfinished > 0 {
        session.problems.report(
            Problem::Backend,
            format!("plugin did not finish within {:?}; some puts may not be recorded", settings.drain_timeout),
        );
    }
    for e in &shutdown.finish_errors {
        session.problems.report(Problem::Backend, format!("finishing: {e}"));
    }
    // After broken input the session is cut short: leave housekeeping to the next.
    if !matches!(ending, Ending::BadInput(_))
        && let Err(e) = session.local.trim(&settings.trim, &settings.state_dir)
    {
        session.problems.report(Problem::Store, e);
    }
    let stats = &session.stats;
    stats.plugin_restarts.add(shutdown.restarts);
    stats.plugin_stuck.add(shutdown.stuck as u64);
    stats.breaker_trips.add(session.breaker.trips());
    let network = session.backend.network();
    stats.network_denials.add(network.denials);
    stats.http_connections.add(network.http_connections);
    stats.http_requests.add(network.http_requests);
    stats.plugin_ms.add(workers.busy().as_millis() as u64);
    stats.remote_wait_ms.add(session.remote_wait_ns.load(Ordering::Relaxed) / 1_000_000);
    stats.wall_ms.add(started.elapsed().as_millis() as u64);
    let summary = Summary { plugin: session.backend.label().to_string(), counts: stats.counts() };
    // Before the answer to close: once it has that, the go command kills its
    // helper (cmd/go cancels the command's context), so nothing after it is
    // sure to happen.
    report(&summary);
    if let Some(id) = close_id {
        // Never an error: cmd/go would fail a successful build over it.
        session.responder.send(&Response { id, ..Default::default() });
    }
    // The go command waits for end of file on our stdout before it exits.
    session.responder.close();
    ending
}

/// What a thread does after reading a request.
enum Next {
    Get {
        id: i64,
        action_id: Digest,
        received: Instant,
    },
    Record(record::Recording),
    /// Answered already.
    Nothing,
}

/// The loop each serving thread runs until the session is over.
fn serve_requests(session: &Arc<Session>, worker: &mut Worker) -> Result<(), Abandoned> {
    loop {
        let next = {
            let mut input = session.input.lock().unwrap();
            if session.end.is_over() {
                drop(input);
                record::drain(session, worker)?;
                return prefetch::help_at_close(session, worker);
            }
            match read_next(session, &mut input) {
                Ok(next) => next,
                Err((ending, close_id)) => {
                    let closed = matches!(ending, Ending::Closed);
                    let _closing = session.prefetch.closing();
                    session.end.set(ending, close_id);
                    drop(input);
                    record::drain(session, worker)?;
                    // Only a session that ended as the go command meant it
                    // to: after `go list` (no close) the list is partial.
                    if closed {
                        prefetch::leave_manifest(session, worker)?;
                    }
                    return Ok(());
                }
            }
        };
        match next {
            Next::Get { id, action_id, received } => get::answer(session, worker, id, action_id, received)?,
            Next::Record(recording) => record::record_or_queue(session, worker, recording)?,
            Next::Nothing => {}
        }
        prefetch::run_if_due(session, worker)?;
    }
}

/// Reads the next request and does what needs no backend. `Err` is the
/// end, with the close request to answer if there was one.
fn read_next(session: &Session, input: &mut Input) -> Result<Next, (Ending, Option<i64>)> {
    let request = match input.next_request() {
        Ok(Some(r)) => r,
        Ok(None) => return Err((Ending::EndOfInput, None)),
        Err(e) => return Err((Ending::BadInput(e), None)),
    };
    match request.command {
        Command::Get { action_id } => Ok(Next::Get { id: request.id, action_id, received: Instant::now() }),
        Command::Put { action_id, output_id, body_size } => {
            put::receive(session, input, request.id, action_id, output_id, body_size)
                .map_err(|e| (Ending::BadInput(e), None))
        }
        Command::Close => Err((Ending::Closed, Some(request.id))),
        Command::Other(name) => {
            session.responder.send(&Response::error(request.id, format!("unknown command {name:?}")));
            Ok(Next::Nothing)
        }
    }
}

/// Serves a go command without a cache, when the local store cannot be used:
/// announces only `close`, so the build goes on, uncached.
pub fn serve_uncached(input: impl BufRead, output: impl Write + Send + 'static) -> Ending {
    let responder = Responder::new(Box::new(output));
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

/// The end of the session: set once by the thread that reads it.
#[derive(Default)]
struct End {
    over: AtomicBool,
    ending: Mutex<Option<(Ending, Option<i64>)>>,
    ended: Condvar,
}

impl End {
    fn is_over(&self) -> bool {
        self.over.load(Ordering::SeqCst)
    }

    fn set(&self, ending: Ending, close_id: Option<i64>) {
        self.over.store(true, Ordering::SeqCst);
        *self.ending.lock().unwrap() = Some((ending, close_id));
        self.ended.notify_all();
    }

    fn wait(&self) -> (Ending, Option<i64>) {
        let mut ending = self.ending.lock().unwrap();
        loop {
            if let Some(end) = ending.take() {
                return end;
            }
            ending = self.ended.wait(ending).unwrap();
        }
    }
}

/// Bodies the backend is known to have (stored or supplied this session),
/// by output id, and how it stores each: never sent to it again, and what
/// an entry for that output says. A body carried in its entry is not had by
/// the backend, and is not kept here.
#[derive(Default)]
struct KnownBodies(Mutex<HashMap<Digest, Stored>>);

impl KnownBodies {
    fn insert(&self, output_id: Digest, stored: &Stored) {
        if !matches!(stored, Stored::Inline { .. }) {
            self.0.lock().unwrap().insert(output_id, stored.clone());
        }
    }

    fn get(&self, output_id: &Digest) -> Option<Stored> {
        self.0.lock().unwrap().get(output_id).cloned()
    }
}

impl Session {
    fn respond_miss(&self, id: i64) {
        self.stats.misses.add(1);
        self.responder.send(&Response::miss(id));
    }

    /// Keeps an entry in the local tier, reporting a failure once.
    fn remember(&self, action_id: &Digest, entry: &crate::domain::Entry) {
        if let Err(e) = self.local.remember(action_id, entry) {
            self.problems.report(Problem::Store, format!("local entries: {e}"));
        }
    }

    /// A backend call failed: counted, said once, and an outage for the breaker.
    fn backend_failed(&self, e: &CallError) {
        match e {
            CallError::Trap(_) => self.stats.plugin_traps.add(1),
            CallError::Timeout(_) => self.stats.plugin_timeouts.add(1),
            CallError::Unavailable(_) | CallError::Broken(_) => self.stats.plugin_errors.add(1),
        }
        self.problems.report(Problem::Backend, e.to_string());
        if e.is_outage() {
            self.breaker.outage();
        }
    }

    /// A call stuck beyond its deadline and out of reach of interruption.
    fn backend_stuck(&self) {
        self.stats.plugin_timeouts.add(1);
        self.problems.report(Problem::Backend, "a call hung past its deadline; its thread was given up".into());
        self.breaker.outage();
    }

    /// An entry the backend returned that no trusted key signed: a miss,
    /// counted, said once.
    fn untrusted(&self) {
        self.stats.untrusted_entries.add(1);
        self.problems.report(
            Problem::Trust,
            "an entry from the plugin is not signed by a trusted key: it is ignored, as are any others like it \
             (untrusted_entries in --stats-json)"
                .into(),
        );
    }

    /// Writes a line to the request log, saying once if that fails.
    fn log_line(&self, line: &Line) {
        if let Err(e) = self.log.write(line) {
            self.problems.report(Problem::Store, e);
        }
    }

    /// No instance could be started for a piece of work.
    fn no_instance(&self) {
        self.problems.report(Problem::Backend, "the plugin could not be started again".into());
        self.breaker.outage();
    }

    /// What the watchdog does for background work stuck in the backend:
    /// there is no request to answer, only the outage to note.
    fn on_stuck(self: &Arc<Self>) -> impl FnOnce() + Send + 'static {
        let session = self.clone();
        move || session.backend_stuck()
    }
}

fn path_string(path: PathBuf) -> String {
    // The state directory is checked to be UTF-8 at start-up, and the names
    // below it are hex.
    path.into_os_string().into_string().expect("store paths are UTF-8")
}
