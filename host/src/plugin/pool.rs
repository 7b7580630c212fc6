//! Plugin instances on threads of their own, fed from one queue.
//!
//! A wasmtime `Store` is used by one thread at a time and WASI's blocking calls
//! must not run on an async executor, so each instance lives on a dedicated
//! thread. Jobs are closures run with the thread's instance; a job that finds
//! no instance (it could not be started) still runs, so that it can answer.
//! Instances other than the first start on their thread's first job, and one
//! that trapped is replaced before the next job.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use super::{CallError, Instance, Template};

pub type Job = Box<dyn FnOnce(Option<&mut Instance>) + Send>;

pub struct Pool {
    jobs: Option<Sender<Job>>,
    done: Receiver<WorkerReport>,
    workers: usize,
    /// Nanoseconds spent inside plugin calls, over all instances so far.
    busy_ns: Arc<AtomicU64>,
}

/// How shutting down went, for statistics and the user.
#[derive(Debug, Default)]
pub struct ShutdownReport {
    /// Workers that did not finish in time (their jobs may be lost).
    pub abandoned: usize,
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
        let busy_ns = Arc::new(AtomicU64::new(0));
        let mut first = Some(first);
        for n in 0..workers {
            let worker = Worker {
                template: template.clone(),
                instance: first.take(),
                jobs: jobs_rx.clone(),
                busy_ns: busy_ns.clone(),
                restarts: 0,
            };
            let done = done_tx.clone();
            thread::Builder::new()
                .name(format!("plugin-{n}"))
                .spawn(move || {
                    let report = worker.run();
                    let _ = done.send(report);
                })
                .expect("spawning a plugin thread");
        }
        Pool { jobs: Some(jobs_tx), done: done_rx, workers, busy_ns }
    }

    /// Queues a job; it runs on whichever instance is free first.
    pub fn submit(&self, job: impl FnOnce(Option<&mut Instance>) + Send + 'static) {
        if let Some(jobs) = &self.jobs {
            // Workers only stop once the sender is dropped, so this cannot fail.
            let _ = jobs.send(Box::new(job));
        }
    }

    pub fn busy(&self) -> Duration {
        Duration::from_nanos(self.busy_ns.load(Ordering::Relaxed))
    }

    /// Runs every queued job, then `finish` on each instance, waiting at most
    /// until `deadline`. Workers still busy then are left behind.
    pub fn shutdown(&mut self, deadline: Instant) -> ShutdownReport {
        self.jobs.take();
        let mut report = ShutdownReport::default();
        for _ in 0..self.workers {
            match self.done.recv_deadline(deadline) {
                Ok(w) => {
                    report.restarts += w.restarts;
                    report.finish_errors.extend(w.finish_error);
                }
                Err(_) => report.abandoned += 1,
            }
        }
        report.abandoned = report.abandoned.min(self.workers);
        report
    }
}

struct Worker {
    template: Arc<Template>,
    instance: Option<Instance>,
    jobs: Receiver<Job>,
    busy_ns: Arc<AtomicU64>,
    restarts: u64,
}

impl Worker {
    fn run(mut self) -> WorkerReport {
        let mut started_once = self.instance.is_some();
        while let Ok(job) = self.jobs.recv() {
            if self.instance.is_none() {
                // A failure to start again is reported by the jobs themselves,
                // as misses; the next job tries again.
                self.instance = self.template.instantiate_open().ok();
                if started_once && self.instance.is_some() {
                    self.restarts += 1;
                }
                started_once |= self.instance.is_some();
            }
            self.run_job(job);
        }
        let finish_error = self.instance.as_mut().and_then(|i| i.finish().err()).map(|e: CallError| e.to_string());
        self.account();
        WorkerReport { finish_error, restarts: self.restarts }
    }

    fn run_job(&mut self, job: Job) {
        job(self.instance.as_mut());
        self.account();
        if self.instance.as_ref().is_some_and(Instance::is_dead) {
            self.instance = None;
        }
    }

    fn account(&mut self) {
        if let Some(i) = self.instance.as_mut() {
            self.busy_ns.fetch_add(i.busy.as_nanos() as u64, Ordering::Relaxed);
            i.busy = Duration::ZERO;
        }
    }
}
