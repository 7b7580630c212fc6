//! Plugin instances, each on a thread of its own, running the caller's loop,
//! watched.
//!
//! A wasmtime `Store` is used by one thread at a time and WASI's blocking calls
//! must not run on an async executor, so each instance lives on a dedicated
//! thread. The thread runs a loop given by the caller (the server's request
//! loop), which reaches its instance through a [`Worker`]: the instance is
//! started before the loop, and replaced after a trap.
//!
//! Epoch deadlines stop runaway WebAssembly, but not a call blocked inside the
//! host (a plugin sleeping, or waiting on a socket that never answers). A
//! watchdog thread looks for calls past their deadline (the same deadline,
//! see `deadline`): it runs the work's `on_stuck` (so that its request is
//! answered now), gives up on that thread, and starts a fresh one running the
//! same loop, so the work goes on. Starting an instance (`describe`, `open`)
//! is watched like any call; a replacement thread starts its instance only
//! when it has work, so a plugin whose `open` hangs costs one stuck thread per
//! attempt, not a loop of them.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use super::deadline::Deadline;
use super::{CallError, Instance, Template};

/// Extra time a call gets beyond its own deadline before the watchdog steps
/// in: epoch interruption normally ends it first, and more cleanly.
const WATCHDOG_GRACE: Duration = Duration::from_secs(1);
/// How often the watchdog looks: short against the grace, and long enough that
/// a helper waiting through a long build is not woken 40 times a second.
const WATCHDOG_PERIOD: Duration = Duration::from_millis(250);

type OnStuck = Box<dyn FnOnce() + Send>;

/// The loop each plugin thread runs, until it returns.
pub type Body = Arc<dyn Fn(&mut Worker) + Send + Sync>;

/// A worker's slot, seen by the watchdog: the deadline of the call in progress.
#[derive(Clone)]
pub struct Watch(Arc<Mutex<Slot>>);

#[derive(Default)]
struct Slot {
    deadline: Option<Deadline>,
    on_stuck: Option<OnStuck>,
    abandoned: bool,
}

impl Watch {
    fn new() -> Watch {
        Watch(Arc::new(Mutex::new(Slot::default())))
    }

    pub fn arm(&self, deadline: Deadline) {
        self.0.lock().unwrap().deadline = Some(deadline);
    }

    pub fn disarm(&self) {
        self.0.lock().unwrap().deadline = None;
    }

    fn begin(&self, on_stuck: OnStuck) {
        self.0.lock().unwrap().on_stuck = Some(on_stuck);
    }

    fn abandoned(&self) -> bool {
        self.0.lock().unwrap().abandoned
    }

    /// Ends a piece of work; true if the watchdog gave up on this worker meanwhile.
    fn end(&self) -> bool {
        let mut slot = self.0.lock().unwrap();
        slot.on_stuck = None;
        slot.abandoned
    }

    /// If the call in progress is overdue: marks the worker abandoned and
    /// hands back the work's `on_stuck`.
    fn take_if_overdue(&self, now: Instant) -> Option<Option<OnStuck>> {
        let mut slot = self.0.lock().unwrap();
        match &slot.deadline {
            Some(d) if d.due() + WATCHDOG_GRACE < now && !slot.abandoned => {
                slot.abandoned = true;
                Some(slot.on_stuck.take())
            }
            _ => None,
        }
    }
}

pub struct Pool {
    done: Receiver<WorkerReport>,
    inner: Arc<Inner>,
    stop_watchdog: Arc<AtomicBool>,
}

struct Inner {
    template: Arc<Template>,
    /// False when the plugin could not be started: threads then never start
    /// an instance.
    usable: bool,
    body: Body,
    done: Sender<WorkerReport>,
    watches: Mutex<Vec<Watch>>,
    spawned: AtomicUsize,
    abandoned: AtomicUsize,
    /// Nanoseconds spent inside plugin calls, over all instances so far.
    busy_ns: AtomicU64,
}

/// How the threads ended, for statistics and the user.
#[derive(Debug, Default)]
pub struct ShutdownReport {
    /// Threads still busy at the deadline (what they were doing may be lost).
    pub unfinished: usize,
    /// Threads given up on because a call was stuck past its deadline.
    pub stuck: usize,
    pub finish_errors: Vec<String>,
    pub restarts: u64,
}

struct WorkerReport {
    finish_error: Option<String>,
    restarts: u64,
}

impl Pool {
    pub(super) fn start(
        template: Arc<Template>,
        first: Option<Instance>,
        workers: usize,
        body: Body,
        usable: bool,
    ) -> Pool {
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        let inner = Arc::new(Inner {
            template,
            usable,
            body,
            done: done_tx,
            watches: Mutex::new(Vec::new()),
            spawned: AtomicUsize::new(0),
            abandoned: AtomicUsize::new(0),
            busy_ns: AtomicU64::new(0),
        });
        let mut first = first;
        for _ in 0..workers {
            // The first threads start their instances right away, ahead of
            // the first requests.
            spawn_worker(&inner, first.take(), true);
        }
        let stop_watchdog = Arc::new(AtomicBool::new(false));
        let (watched, stop) = (inner.clone(), stop_watchdog.clone());
        thread::Builder::new()
            .name("plugin-watchdog".into())
            .spawn(move || watchdog(watched, stop))
            .expect("spawning the plugin watchdog");
        Pool { done: done_rx, inner, stop_watchdog }
    }

    /// Connections the plugin tried and the sandbox refused.
    pub fn network_denials(&self) -> u64 {
        self.inner.template.sandbox.network_denials()
    }

    pub fn busy(&self) -> Duration {
        Duration::from_nanos(self.inner.busy_ns.load(Ordering::Relaxed))
    }

    /// Waits, at most until `deadline`, for every thread's loop to return and
    /// its instance to `finish`. Threads still busy then are left behind.
    pub fn wait(&mut self, deadline: Instant) -> ShutdownReport {
        let mut report = ShutdownReport::default();
        let mut reported = 0;
        loop {
            let expected = self.inner.spawned.load(Ordering::SeqCst) - self.inner.abandoned.load(Ordering::SeqCst);
            if reported >= expected {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                report.unfinished = expected - reported;
                break;
            }
            // Short waits: the watchdog may replace a stuck thread meanwhile.
            if let Ok(w) = self.done.recv_timeout((deadline - now).min(WATCHDOG_PERIOD)) {
                reported += 1;
                report.restarts += w.restarts;
                report.finish_errors.extend(w.finish_error);
            }
        }
        report.stuck = self.inner.abandoned.load(Ordering::SeqCst);
        self.stop_watchdog.store(true, Ordering::SeqCst);
        report
    }
}

fn spawn_worker(inner: &Arc<Inner>, instance: Option<Instance>, eager: bool) {
    let watch = Watch::new();
    inner.watches.lock().unwrap().push(watch.clone());
    let n = inner.spawned.fetch_add(1, Ordering::SeqCst);
    let mut worker =
        Worker { inner: inner.clone(), instance, watch, restarts: 0, started_once: false, abandoned: false, eager };
    thread::Builder::new()
        .name(format!("plugin-{n}"))
        .spawn(move || {
            if let Some(report) = worker.run() {
                let _ = worker.inner.done.send(report);
            }
        })
        .expect("spawning a plugin thread");
}

fn watchdog(inner: Arc<Inner>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::SeqCst) {
        thread::sleep(WATCHDOG_PERIOD);
        let now = Instant::now();
        let stuck: Vec<Option<OnStuck>> = {
            let mut watches = inner.watches.lock().unwrap();
            let mut stuck = Vec::new();
            watches.retain(|w| match w.take_if_overdue(now) {
                Some(on_stuck) => {
                    stuck.push(on_stuck);
                    false
                }
                None => true,
            });
            stuck
        };
        for on_stuck in stuck {
            inner.abandoned.fetch_add(1, Ordering::SeqCst);
            spawn_worker(&inner, None, false);
            if let Some(f) = on_stuck {
                f();
            }
        }
    }
}

/// A plugin thread's handle on its instance.
pub struct Worker {
    inner: Arc<Inner>,
    instance: Option<Instance>,
    watch: Watch,
    restarts: u64,
    started_once: bool,
    abandoned: bool,
    /// Start an instance before the first piece of work.
    eager: bool,
}

impl Worker {
    /// Runs the loop; `None` if the watchdog gave up on this thread (a
    /// replacement took its place and will report).
    fn run(&mut self) -> Option<WorkerReport> {
        if let Some(i) = self.instance.as_mut() {
            i.set_watch(self.watch.clone());
            self.started_once = true;
        } else if self.eager {
            // Watched like any work; there is no request to answer if it hangs.
            self.watch.begin(Box::new(|| {}));
            self.start();
            if self.watch.end() {
                return None;
            }
        }
        let body = self.inner.body.clone();
        body(self);
        if self.abandoned {
            return None;
        }
        let finish_error = self.instance.as_mut().and_then(|i| i.finish().err()).map(|e: CallError| e.to_string());
        self.account();
        if self.watch.end() {
            return None;
        }
        Some(WorkerReport { finish_error, restarts: self.restarts })
    }

    /// Makes an instance if there is none. A failure to start shows up as
    /// `None` in [`Worker::with_instance`]; the next use tries again.
    fn start(&mut self) {
        if self.instance.is_some() || !self.inner.usable {
            return;
        }
        self.instance = self.inner.template.instantiate_open(Some(self.watch.clone())).ok();
        if self.instance.is_some() {
            self.restarts += u64::from(self.started_once);
            self.started_once = true;
        }
    }

    /// Runs `f` with this thread's instance (`None` if none could be started).
    /// If a call in it, or starting it, gets stuck beyond its deadline, the
    /// watchdog runs `on_stuck` and gives up on this thread: then this
    /// returns `None`, and the caller's loop must end.
    pub fn with_instance<T>(
        &mut self,
        on_stuck: impl FnOnce() + Send + 'static,
        f: impl FnOnce(Option<&mut Instance>) -> T,
    ) -> Option<T> {
        self.watch.begin(Box::new(on_stuck));
        self.start();
        // Starting may have hung long enough for the watchdog to answer for it.
        let result = (!self.watch.abandoned()).then(|| f(self.instance.as_mut()));
        self.account();
        if self.watch.end() {
            self.abandoned = true;
            return None;
        }
        if self.instance.as_ref().is_some_and(Instance::is_dead) {
            self.instance = None;
        }
        result
    }

    fn account(&mut self) {
        if let Some(i) = self.instance.as_mut() {
            self.inner.busy_ns.fetch_add(i.busy.as_nanos() as u64, Ordering::Relaxed);
            i.busy = Duration::ZERO;
        }
    }
}
