//! Plugin instances on threads of their own, fed from one queue, watched.
//!
//! A wasmtime `Store` is used by one thread at a time and WASI's blocking calls
//! must not run on an async executor, so each instance lives on a dedicated
//! thread. Jobs are closures run with the thread's instance; a job that finds
//! no instance (it could not be started) still runs, so that it can answer.
//! Instances other than the first start on their thread's first job, and one
//! that trapped is replaced before the next job.
//!
//! Epoch deadlines stop runaway WebAssembly, but not a call blocked inside the
//! host (a plugin sleeping, or waiting on a socket that never answers). A
//! watchdog thread looks for calls past their deadline: it runs the job's
//! `on_stuck` (so its request is answered now), gives up on that thread, and
//! starts a fresh worker in its place so the queue keeps moving.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use super::{CallError, Instance, Template};

/// Extra time a call gets beyond its own deadline before the watchdog steps
/// in: epoch interruption normally ends it first, and more cleanly.
const WATCHDOG_GRACE: Duration = Duration::from_secs(1);
const WATCHDOG_PERIOD: Duration = Duration::from_millis(25);

type OnStuck = Box<dyn FnOnce() + Send>;

/// Work for an instance.
pub struct Job {
    run: Box<dyn FnOnce(Option<&mut Instance>) + Send>,
    on_stuck: Option<OnStuck>,
}

impl Job {
    pub fn new(run: impl FnOnce(Option<&mut Instance>) + Send + 'static) -> Job {
        Job { run: Box::new(run), on_stuck: None }
    }

    /// What to do if a call of this job gets stuck: the job itself may never
    /// finish, so this is the last chance to, say, answer its request.
    pub fn on_stuck(mut self, f: impl FnOnce() + Send + 'static) -> Job {
        self.on_stuck = Some(Box::new(f));
        self
    }
}

/// A worker's slot, seen by the watchdog: the deadline of the call in progress.
#[derive(Clone)]
pub struct Watch(Arc<Mutex<Slot>>);

#[derive(Default)]
struct Slot {
    deadline: Option<Instant>,
    on_stuck: Option<OnStuck>,
    abandoned: bool,
}

impl Watch {
    fn new() -> Watch {
        Watch(Arc::new(Mutex::new(Slot::default())))
    }

    pub fn arm(&self, budget: Duration) {
        self.0.lock().unwrap().deadline = Some(Instant::now() + budget + WATCHDOG_GRACE);
    }

    pub fn disarm(&self) {
        self.0.lock().unwrap().deadline = None;
    }

    fn begin(&self, on_stuck: Option<OnStuck>) {
        self.0.lock().unwrap().on_stuck = on_stuck;
    }

    /// Ends a job; true if the watchdog gave up on this worker meanwhile.
    fn end(&self) -> bool {
        let mut slot = self.0.lock().unwrap();
        slot.on_stuck = None;
        slot.abandoned
    }

    /// If the call in progress is overdue: marks the worker abandoned and
    /// hands back the job's `on_stuck`.
    fn take_if_overdue(&self, now: Instant) -> Option<Option<OnStuck>> {
        let mut slot = self.0.lock().unwrap();
        match slot.deadline {
            Some(d) if d < now && !slot.abandoned => {
                slot.abandoned = true;
                Some(slot.on_stuck.take())
            }
            _ => None,
        }
    }
}

pub struct Pool {
    jobs: Option<Sender<Job>>,
    done: Receiver<WorkerReport>,
    inner: Arc<Inner>,
    stop_watchdog: Arc<AtomicBool>,
}

struct Inner {
    template: Arc<Template>,
    jobs: Receiver<Job>,
    done: Sender<WorkerReport>,
    watches: Mutex<Vec<Watch>>,
    spawned: AtomicUsize,
    abandoned: AtomicUsize,
    /// Nanoseconds spent inside plugin calls, over all instances so far.
    busy_ns: AtomicU64,
}

/// How shutting down went, for statistics and the user.
#[derive(Debug, Default)]
pub struct ShutdownReport {
    /// Workers that did not finish in time (their queued jobs may be lost).
    pub unfinished: usize,
    /// Workers given up on because a call was stuck past its deadline.
    pub stuck: usize,
    pub finish_errors: Vec<String>,
    pub restarts: u64,
}

struct WorkerReport {
    finish_error: Option<String>,
    restarts: u64,
}

impl Pool {
    pub(super) fn start(template: Arc<Template>, first: Instance, workers: usize) -> Pool {
        let (jobs_tx, jobs_rx) = crossbeam_channel::unbounded::<Job>();
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        let inner = Arc::new(Inner {
            template,
            jobs: jobs_rx,
            done: done_tx,
            watches: Mutex::new(Vec::new()),
            spawned: AtomicUsize::new(0),
            abandoned: AtomicUsize::new(0),
            busy_ns: AtomicU64::new(0),
        });
        let mut first = Some(first);
        for _ in 0..workers {
            spawn_worker(&inner, first.take());
        }
        let stop_watchdog = Arc::new(AtomicBool::new(false));
        let (watched, stop) = (inner.clone(), stop_watchdog.clone());
        thread::Builder::new()
            .name("plugin-watchdog".into())
            .spawn(move || watchdog(watched, stop))
            .expect("spawning the plugin watchdog");
        Pool { jobs: Some(jobs_tx), done: done_rx, inner, stop_watchdog }
    }

    /// Queues a job; it runs on whichever instance is free first.
    pub fn submit(&self, job: Job) {
        if let Some(jobs) = &self.jobs {
            // Workers only stop once the sender is dropped, so this cannot fail.
            let _ = jobs.send(job);
        }
    }

    pub fn busy(&self) -> Duration {
        Duration::from_nanos(self.inner.busy_ns.load(Ordering::Relaxed))
    }

    /// Runs every queued job, then `finish` on each instance, waiting at most
    /// until `deadline`. Workers still busy then are left behind.
    pub fn shutdown(&mut self, deadline: Instant) -> ShutdownReport {
        self.jobs.take();
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
            // Short waits: the watchdog may replace a stuck worker meanwhile.
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

fn spawn_worker(inner: &Arc<Inner>, instance: Option<Instance>) {
    let watch = Watch::new();
    inner.watches.lock().unwrap().push(watch.clone());
    let n = inner.spawned.fetch_add(1, Ordering::SeqCst);
    let mut worker = Worker { inner: inner.clone(), instance, watch, restarts: 0 };
    if let Some(i) = worker.instance.as_mut() {
        i.set_watch(worker.watch.clone());
    }
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
            spawn_worker(&inner, None);
            if let Some(f) = on_stuck {
                f();
            }
        }
    }
}

struct Worker {
    inner: Arc<Inner>,
    instance: Option<Instance>,
    watch: Watch,
    restarts: u64,
}

impl Worker {
    /// Runs jobs until the queue closes; `None` if the watchdog gave up on
    /// this worker (a replacement has taken its place and will report).
    fn run(&mut self) -> Option<WorkerReport> {
        let mut started_once = self.instance.is_some();
        // Start before taking jobs, so that no request waits for an instance
        // to be made while another one stands ready.
        self.start(&mut started_once);
        while let Ok(job) = self.inner.jobs.recv() {
            self.start(&mut started_once);
            self.watch.begin(job.on_stuck);
            (job.run)(self.instance.as_mut());
            self.account();
            if self.watch.end() {
                return None;
            }
            if self.instance.as_ref().is_some_and(Instance::is_dead) {
                self.instance = None;
            }
        }
        let finish_error = self.instance.as_mut().and_then(|i| i.finish().err()).map(|e: CallError| e.to_string());
        self.account();
        if self.watch.end() {
            return None;
        }
        Some(WorkerReport { finish_error, restarts: self.restarts })
    }

    /// Makes an instance if there is none. A failure to start is reported by
    /// the jobs themselves, as misses; the next job tries again.
    fn start(&mut self, started_once: &mut bool) {
        if self.instance.is_some() {
            return;
        }
        self.instance = self.inner.template.instantiate_open().ok();
        if let Some(i) = self.instance.as_mut() {
            i.set_watch(self.watch.clone());
            self.restarts += u64::from(*started_once);
            *started_once = true;
        }
    }

    fn account(&mut self) {
        if let Some(i) = self.instance.as_mut() {
            self.inner.busy_ns.fetch_add(i.busy.as_nanos() as u64, Ordering::Relaxed);
            i.busy = Duration::ZERO;
        }
    }
}
