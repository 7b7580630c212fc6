//! The serving core against in-process backends that fail, hang, answer
//! slowly or lie on demand: what gets, puts, the backlog, the breaker,
//! prefetching, the watchdog and the end of a session do, in milliseconds,
//! with neither a go command nor WebAssembly. The end-to-end tests in
//! `tests/` run the same behaviour through the real go command and plugins.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::Value;
use sha2::{Digest as _, Sha256};

use super::request_log::RequestLog;
use super::{Compression, DEFAULT_MISS_STREAK, DEFAULT_MISS_WAIT, Ending, Settings, serve};
use crate::backend::{
    Backend, BodySink, BodySource, CallError, Deadline, Digest, Entry, Instance, ReadBody, StoredEntry,
};
use crate::local::LocalTier;
use crate::local::entries::LocalEntries;
use crate::local::store::{Store, TrimPolicy};
use crate::stats::Summary;
use crate::trust::{PrivateKey, Trust};

/// What a test backend does wrong, call by call.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    Unavailable,
    Broken,
    Trap,
    /// Blocks beyond any deadline, as a call stuck in the host does.
    Hang,
    /// Answers, after this long.
    Slow(Duration),
    /// read-body: bytes that are not the body.
    WrongBytes,
    /// read-body: one byte more than the body.
    TooLong,
    /// read-body: the first bytes, then unavailable (a body that stalls).
    Stall,
}

#[derive(Default)]
struct Faults {
    start: Option<Fault>,
    read_entry: Option<Fault>,
    read_body: Option<Fault>,
    write_body: Option<Fault>,
    write_entry: Option<Fault>,
}

/// A backend in memory, shared by its instances, counting its calls.
struct TestBackend {
    stores_bodies: bool,
    instances: usize,
    unavailable: Option<String>,
    faults: Mutex<Faults>,
    entries: Mutex<HashMap<Digest, StoredEntry>>,
    bodies: Mutex<HashMap<Digest, Vec<u8>>>,
    calls: Mutex<HashMap<&'static str, usize>>,
    started: AtomicUsize,
    /// write-entry calls under way now, and the most there were at once.
    writing: AtomicUsize,
    most_writing: AtomicUsize,
    /// Lets hanging calls go when the test is over.
    released: AtomicBool,
}

impl TestBackend {
    fn new(stores_bodies: bool) -> Arc<TestBackend> {
        Arc::new(TestBackend {
            stores_bodies,
            instances: 4,
            unavailable: None,
            faults: Mutex::default(),
            entries: Mutex::default(),
            bodies: Mutex::default(),
            calls: Mutex::default(),
            started: AtomicUsize::new(0),
            writing: AtomicUsize::new(0),
            most_writing: AtomicUsize::new(0),
            released: AtomicBool::new(false),
        })
    }

    fn calls(&self, name: &str) -> usize {
        self.calls.lock().unwrap().get(name).copied().unwrap_or(0)
    }

    fn set(&self, f: impl FnOnce(&mut Faults)) {
        f(&mut self.faults.lock().unwrap());
    }

    /// Holds `body` under `action` as if an earlier session had stored it.
    fn holds(&self, action: Digest, body: &[u8]) -> Entry {
        let entry = Entry { output_id: sha(body), size: body.len() as u64, put_time_ns: 1 };
        self.entries.lock().unwrap().insert(action, StoredEntry { entry, host_data: Vec::new() });
        self.bodies.lock().unwrap().insert(entry.output_id, body.to_vec());
        entry
    }

    /// Applies `fault`, if any; `Some` ends the call with that answer.
    fn fault(&self, fault: Option<Fault>, deadline: &Deadline) -> Option<CallError> {
        match fault? {
            Fault::Unavailable => Some(CallError::Unavailable("down".into())),
            Fault::Broken => Some(CallError::Broken("broken".into())),
            Fault::Trap => Some(CallError::Trap(anyhow::anyhow!("trapped"))),
            Fault::Hang => {
                let until = Instant::now() + Duration::from_secs(30);
                while !self.released.load(Ordering::SeqCst) && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Some(CallError::Timeout(deadline.elapsed()))
            }
            Fault::Slow(d) => {
                std::thread::sleep(d);
                None
            }
            _ => None,
        }
    }

    fn count(&self, name: &'static str) {
        *self.calls.lock().unwrap().entry(name).or_default() += 1;
    }
}

impl Drop for TestBackend {
    fn drop(&mut self) {
        self.released.store(true, Ordering::SeqCst);
    }
}

struct TestInstance(Arc<TestBackend>);

impl Backend for Arc<TestBackend> {
    fn label(&self) -> &str {
        "test 0"
    }

    fn name(&self) -> &str {
        "test"
    }

    fn stores_bodies(&self) -> bool {
        self.stores_bodies
    }

    fn instances(&self) -> usize {
        self.instances
    }

    fn carries_host_data(&self) -> bool {
        true
    }

    fn unavailable(&self) -> Option<&str> {
        self.unavailable.as_deref()
    }

    fn start(&self, deadline: &Deadline) -> Result<Box<dyn Instance>, CallError> {
        self.started.fetch_add(1, Ordering::SeqCst);
        let fault = self.faults.lock().unwrap().start;
        match self.fault(fault, deadline) {
            Some(e) => Err(e),
            None => Ok(Box::new(TestInstance(self.clone()))),
        }
    }
}

impl Instance for TestInstance {
    fn read_entry(&mut self, action_id: &Digest, deadline: &Deadline) -> Result<Option<StoredEntry>, CallError> {
        let b = &self.0;
        b.count("read_entry");
        let fault = b.faults.lock().unwrap().read_entry;
        if let Some(e) = b.fault(fault, deadline) {
            return Err(e);
        }
        Ok(b.entries.lock().unwrap().get(action_id).cloned())
    }

    fn read_body(
        &mut self,
        output_id: &Digest,
        size: u64,
        mut sink: BodySink,
        deadline: &Deadline,
    ) -> Result<ReadBody, CallError> {
        let b = &self.0;
        b.count("read_body");
        let fault = b.faults.lock().unwrap().read_body;
        let Some(body) = b.bodies.lock().unwrap().get(output_id).cloned() else { return Ok(ReadBody::NotFound) };
        let written = match fault {
            Some(Fault::WrongBytes) => sink.write_all(&vec![0xAB; size as usize]),
            Some(Fault::TooLong) => sink.write_all(&body).and_then(|()| sink.write_all(b"!")),
            Some(Fault::Stall) => {
                let _ = sink.write_all(&body[..body.len().min(16)]);
                return Err(CallError::Unavailable("the body stalled".into()));
            }
            other => match b.fault(other, deadline) {
                Some(e) => return Err(e),
                None => sink.write_all(&body),
            },
        };
        match written {
            Ok(()) => Ok(ReadBody::Written(sink)),
            // The sink refused: it says why when the core finishes it.
            Err(_) => Ok(ReadBody::Written(sink)),
        }
    }

    fn write_body(
        &mut self,
        output_id: &Digest,
        _size: u64,
        mut source: BodySource,
        deadline: &Deadline,
    ) -> Result<(), CallError> {
        let b = &self.0;
        b.count("write_body");
        let fault = b.faults.lock().unwrap().write_body;
        if let Some(e) = b.fault(fault, deadline) {
            return Err(e);
        }
        let mut body = Vec::new();
        source.read_to_end(&mut body).map_err(|e| CallError::Broken(e.to_string()))?;
        b.bodies.lock().unwrap().insert(*output_id, body);
        Ok(())
    }

    fn write_entry(&mut self, action_id: &Digest, entry: &StoredEntry, deadline: &Deadline) -> Result<(), CallError> {
        let b = &self.0;
        b.count("write_entry");
        b.most_writing.fetch_max(b.writing.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
        let fault = b.faults.lock().unwrap().write_entry;
        let result = match b.fault(fault, deadline) {
            Some(e) => Err(e),
            None => {
                b.entries.lock().unwrap().insert(*action_id, entry.clone());
                Ok(())
            }
        };
        b.writing.fetch_sub(1, Ordering::SeqCst);
        result
    }

    fn finish(&mut self, _deadline: &Deadline) -> Result<(), CallError> {
        self.0.count("finish");
        Ok(())
    }
}

fn sha(bytes: &[u8]) -> Digest {
    Sha256::digest(bytes).into()
}

fn action(n: u32) -> Digest {
    sha(format!("action {n}").as_bytes())
}

/// A go command in process: requests into a pipe, responses out of another.
struct GoCommand {
    input: Option<std::io::PipeWriter>,
    responses: crossbeam_channel::Receiver<Value>,
    session: Option<JoinHandle<(Ending, Option<Summary>)>>,
    /// The state directory, when the session made its own.
    _state: Option<tempfile::TempDir>,
}

/// Generous bound on any one answer: a hang fails the test, not the suite.
const ANSWER: Duration = Duration::from_secs(20);

impl GoCommand {
    /// A session on a new state directory of its own.
    fn start(backend: &Arc<TestBackend>) -> GoCommand {
        let state = tempfile::tempdir().unwrap();
        let mut go = GoCommand::start_in(backend, state.path(), Duration::from_secs(5));
        go._state = Some(state);
        go
    }

    fn start_in(backend: &Arc<TestBackend>, state: &Path, drain: Duration) -> GoCommand {
        GoCommand::start_as(backend, state, drain, false, Trust::default(), Compression::None, DEFAULT_MISS_STREAK)
    }

    /// A session on a new state directory that compresses what it sends.
    fn start_compressing(backend: &Arc<TestBackend>) -> GoCommand {
        let state = tempfile::tempdir().unwrap();
        let drain = Duration::from_secs(5);
        let mut go = GoCommand::start_as(
            backend,
            state.path(),
            drain,
            false,
            Trust::default(),
            Compression::Zstd(3),
            DEFAULT_MISS_STREAK,
        );
        go._state = Some(state);
        go
    }

    /// A session on a new state directory, signing and trusting as `trust` says.
    fn start_trusting(backend: &Arc<TestBackend>, trust: Trust, read_only: bool) -> GoCommand {
        let state = tempfile::tempdir().unwrap();
        let drain = Duration::from_secs(5);
        let mut go =
            GoCommand::start_as(backend, state.path(), drain, read_only, trust, Compression::None, DEFAULT_MISS_STREAK);
        go._state = Some(state);
        go
    }

    fn start_as(
        backend: &Arc<TestBackend>,
        state: &Path,
        drain: Duration,
        read_only: bool,
        trust: Trust,
        compression: Compression,
        miss_streak: usize,
    ) -> GoCommand {
        let (input_r, input_w) = std::io::pipe().unwrap();
        let (output_r, output_w) = std::io::pipe().unwrap();
        let store = Store::open(state).unwrap();
        let entries = backend.stores_bodies.then(|| LocalEntries::open(state).unwrap());
        let local = LocalTier::new(store, entries);
        let settings = Settings {
            trim: TrimPolicy { max_age: Duration::MAX, max_size: u64::MAX, interval: Duration::MAX },
            state_dir: state.to_path_buf(),
            call_timeout: Duration::from_millis(100),
            drain_timeout: drain,
            read_only,
            trust,
            compression,
            request_log: RequestLog::off(),
            miss_streak,
            miss_wait: DEFAULT_MISS_WAIT,
        };
        let backend: Arc<dyn Backend> = Arc::new(backend.clone());
        let session = std::thread::spawn(move || {
            let summary = Mutex::new(None);
            let ending = serve(backend, local, settings, input_r, output_w, &|s| {
                *summary.lock().unwrap() = Some(Summary { plugin: s.plugin.clone(), counts: s.counts.clone() })
            });
            (ending, summary.into_inner().unwrap())
        });
        let (tx, rx) = crossbeam_channel::unbounded();
        std::thread::spawn(move || {
            for line in BufReader::new(output_r).lines() {
                let Ok(line) = line else { return };
                if tx.send(serde_json::from_str::<Value>(&line).expect("every line is JSON")).is_err() {
                    return;
                }
            }
        });
        let mut go = GoCommand { input: Some(input_w), responses: rx, session: Some(session), _state: None };
        assert_eq!(go.recv()["ID"], 0, "capabilities first");
        go
    }

    fn send(&mut self, text: &str) {
        self.input.as_mut().unwrap().write_all(text.as_bytes()).unwrap();
    }

    fn get(&mut self, id: i64, action: &Digest) {
        self.send(&format!("{{\"ID\":{id},\"Command\":\"get\",\"ActionID\":\"{}\"}}\n\n", BASE64.encode(action)));
    }

    fn put(&mut self, id: i64, action: &Digest, body: &[u8]) {
        let head = format!(
            "{{\"ID\":{id},\"Command\":\"put\",\"ActionID\":\"{}\",\"OutputID\":\"{}\",\"BodySize\":{}}}\n\n",
            BASE64.encode(action),
            BASE64.encode(sha(body)),
            body.len()
        );
        let body = if body.is_empty() { String::new() } else { format!("\"{}\"\n", BASE64.encode(body)) };
        self.send(&(head + &body));
    }

    fn recv(&mut self) -> Value {
        self.responses.recv_timeout(ANSWER).expect("an answer in time")
    }

    /// Asks for `action` and waits for the answer.
    fn ask(&mut self, id: i64, action: &Digest) -> Value {
        self.get(id, action);
        let answer = self.recv();
        assert_eq!(answer["ID"], id);
        answer
    }

    /// Closes and waits for the session's end; its figures.
    fn close(mut self, id: i64) -> crate::stats::Counts {
        self.send(&format!("{{\"ID\":{id},\"Command\":\"close\"}}\n\n"));
        let started = Instant::now();
        loop {
            let answer = self.recv();
            if answer["ID"] == id {
                break;
            }
            assert!(started.elapsed() < ANSWER, "no answer to close");
        }
        drop(self.input.take());
        let (ending, summary) = self.session.take().unwrap().join().unwrap();
        assert!(matches!(ending, Ending::Closed), "{ending:?}");
        summary.expect("figures reported before close was answered").counts
    }
}

#[test]
fn a_hit_on_an_entry_whose_body_is_here_calls_the_backend_once() {
    let backend = TestBackend::new(false);
    let mut go = GoCommand::start(&backend);
    go.put(1, &action(1), b"compiled");
    assert!(go.recv()["DiskPath"].is_string());
    let stats = go.close(2);
    assert_eq!(stats.puts, 1);
    assert_eq!(backend.calls("write_entry"), 1, "the entry was recorded");
    assert_eq!(backend.calls("write_body"), 0, "never the body: it stays in the local store");

    let mut again = GoCommand::start(&backend);
    assert_eq!(again.ask(1, &action(1))["Miss"], true, "a new store lacks the body");
    assert_eq!(again.ask(2, &action(9))["Miss"], true);
    let stats = again.close(3);
    assert_eq!((stats.hits, stats.misses), (0, 2));
}

#[test]
fn a_body_the_backend_keeps_is_fetched_verified_and_then_local() {
    let backend = TestBackend::new(true);
    let body = b"package archive".repeat(100);
    backend.holds(action(1), &body);
    let mut go = GoCommand::start(&backend);
    let hit = go.ask(1, &action(1));
    let path = hit["DiskPath"].as_str().expect("a hit");
    assert_eq!(std::fs::read(path).unwrap(), body);
    assert_eq!(go.ask(2, &action(1))["DiskPath"].as_str(), Some(path));
    let stats = go.close(3);
    // The second get may come before the entry is kept locally (that happens
    // after the first answer), and then looks the entry up again; the body
    // is never fetched twice.
    assert_eq!((stats.hits, stats.hits_fetched), (2, 1));
    assert_eq!(backend.calls("read_body"), 1, "fetched once, then the local store answers");
}

#[test]
fn bodies_that_are_not_what_their_entry_says_are_never_served() {
    for (fault, counter) in [(Fault::WrongBytes, "rejected_bodies"), (Fault::TooLong, "rejected_bodies")] {
        let backend = TestBackend::new(true);
        backend.holds(action(1), b"the real output");
        backend.set(|f| f.read_body = Some(fault));
        let state = tempfile::tempdir().unwrap();
        let mut go = GoCommand::start_in(&backend, state.path(), Duration::from_secs(5));
        assert_eq!(go.ask(1, &action(1))["Miss"], true, "{fault:?}");
        let stats = go.close(2);
        let named: HashMap<_, _> = stats.named().into_iter().collect();
        assert_eq!(named[counter], 1, "{fault:?}: {stats:?}");
        assert_eq!(stats.hits, 0);
        let objects = std::fs::read_dir(state.path().join("objects")).unwrap().flatten();
        let kept: Vec<_> = objects.filter(|e| e.file_name().len() == 2).collect();
        assert!(kept.is_empty(), "{fault:?}: nothing was kept: {kept:?}");
    }
}

#[test]
fn failures_pause_the_backend_and_each_get_counts_once() {
    for (what, set) in [
        ("read-entry unavailable", (|f: &mut Faults| f.read_entry = Some(Fault::Unavailable)) as fn(&mut Faults)),
        ("bodies that stall", |f: &mut Faults| f.read_body = Some(Fault::Stall)),
    ] {
        let backend = TestBackend::new(true);
        for n in 0..30 {
            backend.holds(action(n), format!("output {n}").repeat(100).as_bytes());
        }
        backend.set(set);
        let mut go = GoCommand::start(&backend);
        for n in 0..30 {
            assert_eq!(go.ask(n as i64 + 1, &action(n))["Miss"], true);
        }
        let stats = go.close(100);
        assert!(stats.breaker_trips >= 1, "{what}: {stats:?}");
        assert!(stats.skipped_while_paused >= 20, "{what}: {stats:?}");
        assert!(backend.calls("read_entry") <= 10, "{what}: the backend was left alone: {stats:?}");
    }
}

#[test]
fn a_call_stuck_beyond_its_deadline_is_answered_and_its_thread_replaced() {
    let backend = TestBackend::new(false);
    backend.set(|f| f.read_entry = Some(Fault::Hang));
    let mut go = GoCommand::start(&backend);
    let started = Instant::now();
    assert_eq!(go.ask(1, &action(1))["Miss"], true);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "the watchdog answered after {took:?}");
    // The build goes on: puts are stored and answered while threads are stuck.
    go.put(2, &action(2), b"x");
    assert!(go.recv()["DiskPath"].is_string());
    let stats = go.close(3);
    assert!(stats.plugin_stuck >= 1 && stats.plugin_timeouts >= 1, "{stats:?}");
}

#[test]
fn a_trapped_instance_is_replaced() {
    let mut backend = TestBackend::new(false);
    // One thread, so that the next get lands where the trap was.
    Arc::get_mut(&mut backend).unwrap().instances = 1;
    backend.set(|f| f.read_entry = Some(Fault::Trap));
    let mut go = GoCommand::start(&backend);
    assert_eq!(go.ask(1, &action(1))["Miss"], true);
    backend.set(|f| f.read_entry = None);
    assert_eq!(go.ask(2, &action(2))["Miss"], true);
    let stats = go.close(3);
    assert_eq!(stats.plugin_traps, 1);
    assert!(stats.plugin_restarts >= 1, "{stats:?}");
    assert!(backend.started.load(Ordering::SeqCst) > backend.instances, "a fresh instance was started");
}

#[test]
fn a_backend_that_cannot_start_leaves_the_local_store_serving() {
    let mut backend = TestBackend::new(true);
    Arc::get_mut(&mut backend).unwrap().unavailable = Some("down at open".into());
    let mut go = GoCommand::start(&backend);
    go.put(1, &action(1), b"built here");
    assert!(go.recv()["DiskPath"].is_string());
    assert!(go.ask(2, &action(1))["DiskPath"].is_string(), "read your writes from the local tier");
    assert_eq!(go.ask(3, &action(2))["Miss"], true);
    let stats = go.close(4);
    assert_eq!(backend.started.load(Ordering::SeqCst), 0, "no instance is even tried");
    assert_eq!((stats.local_only_puts, stats.hits_local), (1, 1), "{stats:?}");
}

#[test]
fn puts_are_answered_at_once_and_all_recorded_by_the_close() {
    // A slow backend and many puts: the backlog takes them, gets of the
    // same actions are answered from the puts meanwhile, and close waits
    // until every one is recorded.
    let backend = TestBackend::new(true);
    backend.set(|f| f.write_entry = Some(Fault::Slow(Duration::from_millis(5))));
    let mut go = GoCommand::start(&backend);
    let n = 200;
    for i in 0..n {
        go.put(i as i64 + 1, &action(i), format!("output {i}").as_bytes());
    }
    for _ in 0..n {
        assert!(go.recv()["DiskPath"].is_string());
    }
    assert!(go.ask(1000, &action(7))["DiskPath"].is_string());
    let stats = go.close(1001);
    let entries = backend.entries.lock().unwrap();
    assert!((0..n).all(|i| entries.contains_key(&action(i))), "{stats:?}");
    // Each body small enough to travel in its entry: only the session's
    // manifest goes as a body.
    assert_eq!(backend.calls("write_body"), 1);
    assert_eq!(
        (stats.puts_not_recorded, stats.local_only_puts, stats.inline_bodies),
        (0, 0, u64::from(n)),
        "{stats:?}"
    );
}

#[test]
fn small_outputs_travel_in_their_entries_and_are_read_back_without_a_body_call() {
    let backend = TestBackend::new(true);
    let mut first = GoCommand::start(&backend);
    let small = |i: u32| format!("small output {i}").into_bytes();
    for i in 0..4u32 {
        first.put(i as i64 + 1, &action(i), &small(i));
        first.recv();
    }
    first.put(5, &action(9), &compressible(9));
    first.recv();
    let up = first.close(6);
    assert_eq!((up.inline_bodies, backend.calls("write_body")), (4, 1), "{up:?}");

    let mut second = GoCommand::start(&backend);
    for i in 0..4u32 {
        let hit = second.ask(i as i64 + 1, &action(i));
        let path = hit["DiskPath"].as_str().unwrap_or_else(|| panic!("output {i}: {hit}"));
        assert_eq!(std::fs::read(path).unwrap(), small(i));
    }
    let down = second.close(10);
    assert_eq!((down.hits_fetched, backend.calls("read_body")), (4, 0), "{down:?}");
}

#[test]
fn the_latest_put_of_an_action_is_the_one_recorded() {
    let backend = TestBackend::new(false);
    backend.set(|f| f.write_entry = Some(Fault::Slow(Duration::from_millis(2))));
    let mut go = GoCommand::start(&backend);
    for i in 0..50u32 {
        go.put(i as i64 + 1, &action(1), format!("version {i}").as_bytes());
    }
    for _ in 0..50 {
        go.recv();
    }
    go.close(51);
    let recorded = backend.entries.lock().unwrap()[&action(1)].entry;
    assert_eq!(recorded.output_id, sha(b"version 49"));
}

#[test]
fn a_session_leaves_a_manifest_and_the_next_one_prefetches_from_it() {
    let backend = TestBackend::new(true);
    let mut first = GoCommand::start(&backend);
    // As the go command does: ask, miss, build, put.
    for i in 0..40u32 {
        assert_eq!(first.ask(i as i64 * 2 + 1, &action(i))["Miss"], true);
        first.put(i as i64 * 2 + 2, &action(i), format!("output {i}").repeat(1000).as_bytes());
        first.recv();
    }
    first.close(100);

    // Another machine, starting the same way.
    let mut second = GoCommand::start(&backend);
    for i in 0..40u32 {
        assert!(second.ask(i as i64 + 1, &action(i))["DiskPath"].is_string(), "output {i}");
    }
    let stats = second.close(100);
    assert_eq!(stats.manifest_items, 40, "{stats:?}");
    assert!(stats.prefetched > 0, "{stats:?}");
    assert_eq!(stats.hits, 40);
}

#[test]
fn the_manifest_pointers_are_written_side_by_side_at_close() {
    let backend = TestBackend::new(true);
    let mut first = GoCommand::start(&backend);
    for i in 0..40u32 {
        assert_eq!(first.ask(i as i64 * 2 + 1, &action(i))["Miss"], true);
        first.put(i as i64 * 2 + 2, &action(i), format!("output {i}").repeat(1000).as_bytes());
        first.recv();
    }
    // Every put recorded before close, so that the writes at close are the
    // manifest's pointers alone; each takes a while, as a round trip does.
    let until = Instant::now() + ANSWER;
    while backend.calls("write_entry") < 40 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(backend.calls("write_entry"), 40);
    backend.most_writing.store(0, Ordering::SeqCst);
    backend.set(|f| f.write_entry = Some(Fault::Slow(Duration::from_millis(40))));
    first.close(100);
    assert_eq!(backend.calls("write_entry"), 40 + 16, "a pointer under each of the first 16 gets");
    let at_once = backend.most_writing.load(Ordering::SeqCst);
    assert!(at_once > 1, "the pointers were written one at a time: {at_once} at once");

    backend.set(|f| f.write_entry = None);
    let mut second = GoCommand::start(&backend);
    assert!(second.ask(1, &action(5))["DiskPath"].is_string());
    assert_eq!(second.close(100).manifest_items, 40, "the pointer under a later first get leads to it");
}

/// Outputs that compress, as Go's do.
/// Tens of kilobytes that zstd makes several times smaller, and still too
/// large to travel inside an entry.
fn compressible(i: u32) -> Vec<u8> {
    (0..1000u32)
        .flat_map(|k| format!("package p{i}; func F{k}() int {{ return {} }}\n", k * (i + 7)).into_bytes())
        .collect()
}

#[test]
fn compressed_bodies_are_stored_under_their_own_hash_and_read_back_whole() {
    let backend = TestBackend::new(true);
    let mut first = GoCommand::start_compressing(&backend);
    for i in 0..4u32 {
        assert_eq!(first.ask(i as i64 * 2 + 1, &action(i))["Miss"], true);
        first.put(i as i64 * 2 + 2, &action(i), &compressible(i));
        first.recv();
    }
    let up = first.close(100);
    let sent: u64 = backend.bodies.lock().unwrap().values().map(|b| b.len() as u64).sum();
    assert_eq!(up.remote_bytes_up, sent, "{up:?}");
    assert!(up.remote_bytes_up * 4 < up.put_bytes, "{up:?}");
    for (id, stored) in backend.bodies.lock().unwrap().iter() {
        assert_eq!(*id, sha(stored), "a store may check its keys against the content");
    }

    // Another machine, without compression of its own, reads them.
    let mut second = GoCommand::start(&backend);
    for i in 0..4u32 {
        let hit = second.ask(i as i64 + 1, &action(i));
        let path = hit["DiskPath"].as_str().unwrap_or_else(|| panic!("output {i}: {hit}"));
        assert_eq!(std::fs::read(path).unwrap(), compressible(i));
        assert_eq!(hit["OutputID"], BASE64.encode(sha(&compressible(i))));
    }
    let down = second.close(100);
    assert_eq!((down.hits_fetched, down.remote_bytes_down), (4, sent), "{down:?}");
}

#[test]
fn entries_stored_before_compression_are_still_served() {
    let backend = TestBackend::new(true);
    backend.holds(action(1), &compressible(1));
    let mut go = GoCommand::start_compressing(&backend);
    let hit = go.ask(1, &action(1));
    assert_eq!(std::fs::read(hit["DiskPath"].as_str().unwrap()).unwrap(), compressible(1));
    assert_eq!(go.close(2).hits_fetched, 1);
}

#[test]
fn a_damaged_compressed_body_is_rejected_and_counted() {
    let backend = TestBackend::new(true);
    let mut first = GoCommand::start_compressing(&backend);
    first.put(1, &action(1), &compressible(1));
    first.recv();
    first.close(2);
    for body in backend.bodies.lock().unwrap().values_mut() {
        let middle = body.len() / 2;
        body[4] ^= 0x55;
        body[middle] ^= 0x55;
    }
    let state = tempfile::tempdir().unwrap();
    let mut second = GoCommand::start_in(&backend, state.path(), Duration::from_secs(5));
    assert_eq!(second.ask(1, &action(1))["Miss"], true);
    let stats = second.close(2);
    assert_eq!((stats.rejected_bodies, stats.hits, stats.plugin_errors), (1, 0, 0), "{stats:?}");
    let objects = std::fs::read_dir(state.path().join("objects")).unwrap().flatten();
    assert!(!objects.into_iter().any(|e| e.file_name().len() == 2), "nothing was kept");
}

#[test]
fn a_compressed_cache_prefetches_from_its_manifest_without_lookups() {
    let backend = TestBackend::new(true);
    let mut first = GoCommand::start_compressing(&backend);
    for i in 0..40u32 {
        assert_eq!(first.ask(i as i64 * 2 + 1, &action(i))["Miss"], true);
        first.put(i as i64 * 2 + 2, &action(i), &compressible(i));
        first.recv();
    }
    first.close(100);
    let lookups_before = backend.calls("read_entry");

    let mut second = GoCommand::start(&backend);
    let first_hit = second.ask(1, &action(0));
    assert!(first_hit["DiskPath"].is_string());
    // The manifest is found after the first get; what it lists then comes in
    // the background (the first output and the manifest, then every output
    // too large to travel in it). Wait for it, boundedly, then ask for all.
    let large = (1..40u32).filter(|&i| compressible(i).len() as u64 > crate::manifest::INLINE_MAX).count();
    assert!(large > 10, "most outputs are fetched, not carried in the manifest");
    let until = Instant::now() + ANSWER;
    while backend.calls("read_body") < 2 + large && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(5));
    }
    for i in 1..40u32 {
        assert!(second.ask(i as i64 + 1, &action(i))["DiskPath"].is_string(), "output {i}");
    }
    let stats = second.close(100);
    assert_eq!((stats.manifest_items, stats.hits), (40, 40), "{stats:?}");
    let lookups = backend.calls("read_entry") - lookups_before;
    assert!(lookups <= 3, "the manifest said where each body is: {lookups} lookups; {stats:?}");
}

#[test]
fn after_a_streak_of_misses_gets_are_answered_at_once_until_the_backend_has_one() {
    let backend = TestBackend::new(true);
    let state = tempfile::tempdir().unwrap();
    let drain = Duration::from_secs(5);
    let mut go = GoCommand::start_as(&backend, state.path(), drain, false, Trust::default(), Compression::None, 4);
    for n in 0..8 {
        assert_eq!(go.ask(n as i64 + 1, &action(n))["Miss"], true);
    }
    // The go command builds what was answered early; a get found after all
    // ends the streak, and the ones after it wait for their answer again.
    backend.holds(action(100), b"built elsewhere");
    backend.holds(action(101), b"also built elsewhere");
    assert_eq!(go.ask(9, &action(100))["Miss"], true, "answered before it was looked up");
    let mut asked = 0;
    let hit = loop {
        asked += 1;
        let answer = go.ask(10 + asked, &action(101));
        if answer["Miss"] != true || asked == 100 {
            break answer;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(
        std::fs::read(hit["DiskPath"].as_str().expect("a hit once the streak ended")).unwrap(),
        b"also built elsewhere"
    );
    let stats = go.close(200);
    assert_eq!(stats.misses_early, 4 + asked as u64, "{stats:?}");
    assert!(stats.misses_early_found >= 1, "{stats:?}");
    assert_eq!(backend.calls("read_body"), 1, "only the body of the hit was fetched: {stats:?}");
}

#[test]
fn a_streak_goes_on_when_a_late_lookup_finds_the_sessions_own_upload() {
    let backend = TestBackend::new(true);
    let state = tempfile::tempdir().unwrap();
    let drain = Duration::from_secs(5);
    let mut go = GoCommand::start_as(&backend, state.path(), drain, false, Trust::default(), Compression::None, 4);
    for n in 0..4 {
        assert_eq!(go.ask(n as i64 + 1, &action(n))["Miss"], true);
    }
    // Answered early; its lookup is slow, and the go command builds and
    // puts the action before the lookup reads: the lookup finds the put.
    backend.set(|f| f.read_entry = Some(Fault::Slow(Duration::from_millis(90))));
    assert_eq!(go.ask(5, &action(10))["Miss"], true);
    go.put(6, &action(10), b"built here");
    go.recv();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(go.ask(7, &action(11))["Miss"], true);
    let stats = go.close(100);
    assert_eq!((stats.misses_early, stats.misses_early_found), (2, 0), "the streak went on: {stats:?}");
}

#[test]
fn a_far_remote_starts_a_streak_once_its_misses_have_cost_the_wait() {
    // Each lookup takes 40 ms, as 20 ms away: the default 100 ms of waiting is
    // reached at the third miss, long before 32 of them.
    let backend = TestBackend::new(true);
    backend.set(|f| f.read_entry = Some(Fault::Slow(Duration::from_millis(40))));
    let mut go = GoCommand::start(&backend);
    let asked = 12;
    for n in 0..asked {
        assert_eq!(go.ask(n as i64 + 1, &action(n))["Miss"], true);
    }
    let stats = go.close(100);
    assert!(
        (asked as u64 - 4..asked as u64).contains(&stats.misses_early),
        "three waited on, the rest answered at once: {stats:?}"
    );
}

#[test]
fn the_end_of_a_session_is_bounded_by_the_drain_timeout() {
    let backend = TestBackend::new(false);
    let state = tempfile::tempdir().unwrap();
    let mut go = GoCommand::start_in(&backend, state.path(), Duration::from_millis(300));
    backend.set(|f| f.write_entry = Some(Fault::Slow(Duration::from_secs(30))));
    go.put(1, &action(1), b"x");
    go.recv();
    let started = Instant::now();
    go.close(2);
    assert!(started.elapsed() < Duration::from_secs(10), "close waited {:?}", started.elapsed());
}

#[test]
fn broken_answers_are_misses_that_never_pause_the_backend() {
    // Corrupt data, a bug: retrying will not fix it, but the backend is up,
    // and pausing it would cost every other request its hits.
    let backend = TestBackend::new(false);
    backend.set(|f| f.read_entry = Some(Fault::Broken));
    let mut go = GoCommand::start(&backend);
    for n in 0..10 {
        assert_eq!(go.ask(n as i64 + 1, &action(n))["Miss"], true);
    }
    let stats = go.close(11);
    assert_eq!((stats.plugin_errors, stats.breaker_trips, stats.skipped_while_paused), (10, 0, 0));
}

/// A key of the tests' own, made from `n`.
fn key(n: u8) -> PrivateKey {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("k");
    let text = format!("gocp-ed25519-private:{}\n", BASE64.encode([n; 32]));
    std::fs::write(&file, text).unwrap();
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    PrivateKey::from_file(&file).unwrap()
}

/// Puts `n` outputs, asking for each first as the go command does.
fn build(go: &mut GoCommand, n: u32) {
    for i in 0..n {
        assert_eq!(go.ask(i as i64 * 2 + 1, &action(i))["Miss"], true);
        go.put(i as i64 * 2 + 2, &action(i), format!("output {i}").repeat(100).as_bytes());
        assert!(go.recv()["DiskPath"].is_string());
    }
}

#[test]
fn signed_entries_are_used_only_by_readers_that_trust_the_key() {
    let backend = TestBackend::new(true);
    let mut main = GoCommand::start_trusting(&backend, Trust::new(Some(key(1)), Vec::new()), false);
    build(&mut main, 10);
    main.close(100);
    assert!(backend.entries.lock().unwrap().values().all(|e| !e.host_data.is_empty()), "every entry signed");
    assert!(
        (0..10).all(|i| !backend.entries.lock().unwrap().contains_key(&action(i))),
        "none under the plain action ids: a signer writes in its own namespace"
    );

    let mut trusting = GoCommand::start_trusting(&backend, Trust::new(None, vec![key(1).public()]), true);
    for i in 0..10 {
        assert!(trusting.ask(i as i64 + 1, &action(i))["DiskPath"].is_string(), "output {i}");
    }
    assert_eq!(trusting.close(100).untrusted_entries, 0);

    // Trusting another key, or none, the signed entries are not even found.
    for trust in [Trust::new(None, vec![key(2).public()]), Trust::default()] {
        let mut other = GoCommand::start_trusting(&backend, trust, true);
        for i in 0..10 {
            assert_eq!(other.ask(i as i64 + 1, &action(i))["Miss"], true);
        }
        other.close(100);
    }
}

#[test]
fn entries_changed_by_whoever_can_write_the_store_are_misses() {
    let backend = TestBackend::new(true);
    let mut main = GoCommand::start_trusting(&backend, Trust::new(Some(key(1)), Vec::new()), false);
    build(&mut main, 10);
    main.close(100);
    // Swap what two actions' entries say, signatures and all: each is a
    // well-formed entry, signed by the trusted key, for another action.
    {
        let mut entries = backend.entries.lock().unwrap();
        let trust = Trust::new(None, vec![key(1).public()]);
        let (a, b) = (trust.lookups(&action(3))[0].key, trust.lookups(&action(4))[0].key);
        let (ea, eb) = (entries[&a].clone(), entries[&b].clone());
        entries.insert(a, eb);
        entries.insert(b, ea);
    }
    let mut reader = GoCommand::start_trusting(&backend, Trust::new(None, vec![key(1).public()]), true);
    for i in 0..10 {
        let answer = reader.ask(i as i64 + 1, &action(i));
        assert_eq!(answer["Miss"] == true, i == 3 || i == 4, "output {i}: {answer}");
    }
    let stats = reader.close(100);
    assert_eq!(stats.untrusted_entries, 2, "{stats:?}");
}

#[test]
fn a_read_only_session_gives_the_backend_nothing_to_write() {
    let backend = TestBackend::new(true);
    let mut go = GoCommand::start_trusting(&backend, Trust::default(), true);
    build(&mut go, 40);
    assert!(go.ask(1000, &action(5))["DiskPath"].is_string(), "its own puts are served");
    let stats = go.close(1001);
    assert_eq!((backend.calls("write_entry"), backend.calls("write_body")), (0, 0), "no manifest either");
    assert_eq!(stats.local_only_puts, 40);
    assert!(backend.calls("read_entry") > 0, "but it reads");
}
