//! The serving threads, each with a backend instance of its own, and the
//! watchdog that answers for a call stuck beyond its deadline.
//!
//! Calls into one instance must not overlap, and a backend call may block
//! (on a disk, a socket, a plugin that sleeps), so each instance lives on a
//! thread of its own that runs the session's request loop and makes its
//! calls itself: no request waits for a hand-off between threads.
//!
//! Every call runs under a [`Deadline`] (its timeout, plus what the bytes it
//! moves earn), armed where the watchdog sees it. A backend should stop a call
//! at its deadline itself; one that cannot (a call blocked inside the host)
//! is caught by the watchdog a grace period later: it runs the work's
//! `on_stuck` (so its request is answered now), gives the thread up, and
//! starts a fresh one running the same loop, whose instance starts when it
//! has work. Starting an instance is watched like a call.
//!
//! It owns the threads, the instances and the deadlines; it knows nothing of
//! requests, and never lets a backend failure end a thread other than by
//! giving it up.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::backend::{
    Backend, BodySink, BodySource, CallError, Deadline, Digest, Instance, Progress, ReadBody, StoredEntry,
};

/// Extra time a call gets beyond its own deadline before the watchdog steps
/// in: a backend that can stop its own calls does so first, and more cleanly.
const WATCHDOG_GRACE: Duration = Duration::from_secs(1);
/// How often the watchdog looks: short against the grace, and long enough that
/// a helper waiting through a long build is not woken 40 times a second.
const WATCHDOG_PERIOD: Duration = Duration::from_millis(250);

/// The watchdog gave up on this thread while it was stuck in a call: a
/// replacement reads on, and this thread must stop serving.
#[derive(Debug)]
pub struct Abandoned;

type OnStuck = Box<dyn FnOnce() + Send>;

/// The loop each thread runs, until it returns (or is given up on).
pub type Body = Arc<dyn Fn(&mut Worker) -> Result<(), Abandoned> + Send + Sync>;

/// A thread's slot, seen by the watchdog: the deadline of the call in progress.
#[derive(Clone)]
struct Watch(Arc<Mutex<Slot>>);

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

    fn arm(&self, deadline: &Deadline) {
        self.0.lock().unwrap().deadline = Some(deadline.clone());
    }

    fn disarm(&self) {
        self.0.lock().unwrap().deadline = None;
    }

    fn begin(&self, on_stuck: OnStuck) {
        self.0.lock().unwrap().on_stuck = Some(on_stuck);
    }

    fn abandoned(&self) -> bool {
        self.0.lock().unwrap().abandoned
    }

    /// Ends a piece of work; `Err` if the watchdog gave up on this thread meanwhile.
    fn end(&self) -> Result<(), Abandoned> {
        let mut slot = self.0.lock().unwrap();
        slot.on_stuck = None;
        if slot.abandoned { Err(Abandoned) } else { Ok(()) }
    }

    /// If the call in progress is overdue: marks the thread abandoned and
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

/// The threads serving one session.
pub struct Workers {
    done: Receiver<Report>,
    inner: Arc<Inner>,
    stop_watchdog: Arc<AtomicBool>,
}

struct Inner {
    backend: Arc<dyn Backend>,
    /// Each call's timeout, before what its bytes earn.
    timeout: Duration,
    body: Body,
    done: Sender<Report>,
    watches: Mutex<Vec<Watch>>,
    spawned: AtomicUsize,
    abandoned: AtomicUsize,
    /// Nanoseconds spent inside backend calls, over all instances so far.
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
    /// Instances replaced after a trap or a timeout.
    pub restarts: u64,
}

struct Report {
    finish_error: Option<String>,
    restarts: u64,
}

impl Workers {
    /// Starts `threads` threads, each running `body` with an instance of
    /// `backend` (started ahead of the first request; never, for a backend
    /// that could not be started at all), and the watchdog.
    pub fn start(backend: Arc<dyn Backend>, threads: usize, timeout: Duration, body: Body) -> Workers {
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        let inner = Arc::new(Inner {
            backend,
            timeout,
            body,
            done: done_tx,
            watches: Mutex::new(Vec::new()),
            spawned: AtomicUsize::new(0),
            abandoned: AtomicUsize::new(0),
            busy_ns: AtomicU64::new(0),
        });
        for _ in 0..threads {
            spawn(&inner, true);
        }
        let stop_watchdog = Arc::new(AtomicBool::new(false));
        let (watched, stop) = (inner.clone(), stop_watchdog.clone());
        thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || watchdog(watched, stop))
            .expect("spawning the watchdog");
        Workers { done: done_rx, inner, stop_watchdog }
    }

    /// Time spent inside backend calls so far.
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
            if let Ok(r) = self.done.recv_timeout((deadline - now).min(WATCHDOG_PERIOD)) {
                reported += 1;
                report.restarts += r.restarts;
                report.finish_errors.extend(r.finish_error);
            }
        }
        report.stuck = self.inner.abandoned.load(Ordering::SeqCst);
        self.stop_watchdog.store(true, Ordering::SeqCst);
        report
    }
}

fn spawn(inner: &Arc<Inner>, eager: bool) {
    let watch = Watch::new();
    inner.watches.lock().unwrap().push(watch.clone());
    let n = inner.spawned.fetch_add(1, Ordering::SeqCst);
    let mut worker = Worker {
        inner: inner.clone(),
        instance: None,
        watch,
        progress: Progress::default(),
        restarts: 0,
        started_once: false,
        eager,
    };
    thread::Builder::new()
        .name(format!("serve-{n}"))
        .spawn(move || {
            if let Ok(report) = worker.run() {
                let _ = worker.inner.done.send(report);
            }
        })
        .expect("spawning a serving thread");
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
            spawn(&inner, false);
            if let Some(f) = on_stuck {
                f();
            }
        }
    }
}

/// A serving thread's handle on its instance.
pub struct Worker {
    inner: Arc<Inner>,
    instance: Option<Box<dyn Instance>>,
    watch: Watch,
    /// Bytes the call in progress moved (see `deadline`).
    progress: Progress,
    restarts: u64,
    started_once: bool,
    /// Start an instance before the first piece of work.
    eager: bool,
}

impl Worker {
    fn run(&mut self) -> Result<Report, Abandoned> {
        if self.eager {
            // Watched like any work; there is no request to answer if it hangs.
            self.watch.begin(Box::new(|| {}));
            self.start();
            self.watch.end()?;
        }
        let body = self.inner.body.clone();
        body(self)?;
        let mut finish_error = None;
        if let Some(instance) = self.instance.as_mut() {
            let mut calls = Calls::new(instance.as_mut(), &self.inner, &self.watch, &self.progress);
            finish_error = calls.finish().err().map(|e| e.to_string());
        }
        self.watch.end()?;
        Ok(Report { finish_error, restarts: self.restarts })
    }

    /// Starts an instance if there is none (and the backend could be started
    /// at all). A failure to start shows as `None` in [`Worker::work`]; the
    /// next piece of work tries again.
    fn start(&mut self) {
        if self.instance.is_some() || self.inner.backend.unavailable().is_some() {
            return;
        }
        let deadline = Deadline::start(self.inner.timeout, &self.progress);
        self.watch.arm(&deadline);
        let started = Instant::now();
        self.instance = self.inner.backend.start(&deadline).ok();
        self.inner.busy_ns.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        self.watch.disarm();
        if self.instance.is_some() {
            self.restarts += u64::from(self.started_once);
            self.started_once = true;
        }
    }

    /// Runs `work` with this thread's instance (`None` if none could be
    /// started). If a call in it, or starting the instance, gets stuck
    /// beyond its deadline, the watchdog runs `on_stuck` and gives up on this
    /// thread: then this returns [`Abandoned`], and the caller's loop must end.
    pub fn work<T>(
        &mut self,
        on_stuck: impl FnOnce() + Send + 'static,
        work: impl FnOnce(Option<&mut Calls<'_>>) -> T,
    ) -> Result<T, Abandoned> {
        self.watch.begin(Box::new(on_stuck));
        self.start();
        // Starting may have hung long enough for the watchdog to answer for it.
        if self.watch.abandoned() {
            let _ = self.watch.end();
            return Err(Abandoned);
        }
        let mut dead = false;
        let result = match self.instance.as_mut() {
            Some(instance) => {
                let mut calls = Calls::new(instance.as_mut(), &self.inner, &self.watch, &self.progress);
                let result = work(Some(&mut calls));
                dead = calls.dead;
                result
            }
            None => work(None),
        };
        self.watch.end()?;
        if dead {
            self.instance = None;
        }
        Ok(result)
    }
}

/// The calls of one piece of work, each under a deadline of its own. After a
/// trap or a timeout the instance is dead: it gets no more calls, and is
/// replaced before the next piece of work.
pub struct Calls<'a> {
    instance: &'a mut dyn Instance,
    inner: &'a Inner,
    watch: &'a Watch,
    progress: &'a Progress,
    dead: bool,
}

impl<'a> Calls<'a> {
    fn new(instance: &'a mut dyn Instance, inner: &'a Inner, watch: &'a Watch, progress: &'a Progress) -> Self {
        Calls { instance, inner, watch, progress, dead: false }
    }

    /// What body sinks and sources of these calls count their bytes into.
    pub fn progress(&self) -> &Progress {
        self.progress
    }

    pub fn read_entry(&mut self, action_id: &Digest) -> Result<Option<StoredEntry>, CallError> {
        self.call(|i, d| i.read_entry(action_id, d))
    }

    pub fn read_body(&mut self, output_id: &Digest, size: u64, sink: BodySink) -> Result<ReadBody, CallError> {
        self.call(|i, d| i.read_body(output_id, size, sink, d))
    }

    pub fn write_body(&mut self, output_id: &Digest, size: u64, source: BodySource) -> Result<(), CallError> {
        self.call(|i, d| i.write_body(output_id, size, source, d))
    }

    pub fn write_entry(&mut self, action_id: &Digest, entry: &StoredEntry) -> Result<(), CallError> {
        self.call(|i, d| i.write_entry(action_id, entry, d))
    }

    fn finish(&mut self) -> Result<(), CallError> {
        self.call(|i, d| i.finish(d))
    }

    fn call<T>(
        &mut self,
        f: impl FnOnce(&mut dyn Instance, &Deadline) -> Result<T, CallError>,
    ) -> Result<T, CallError> {
        if self.dead {
            return Err(CallError::Trap(anyhow::anyhow!("the instance failed earlier in this request")));
        }
        let deadline = Deadline::start(self.inner.timeout, self.progress);
        self.watch.arm(&deadline);
        let result = f(self.instance, &deadline);
        self.inner.busy_ns.fetch_add(deadline.elapsed().as_nanos() as u64, Ordering::Relaxed);
        self.watch.disarm();
        if let Err(e) = &result
            && e.kills_instance()
        {
            self.dead = true;
        }
        result
    }
}
