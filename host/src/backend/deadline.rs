//! How long a backend call may run: its timeout, plus whatever time the
//! bytes it actually moved earn at a minimum pace.
//!
//! A body of hundreds of megabytes needs more than the timeout, but what a
//! backend claims about a body must never buy it time: a claimed size is only
//! a number, and an entry claiming 64 GiB would otherwise hold a get for
//! hours. So a call's time grows with the bytes that crossed the core's body
//! sink or source (see `serve::stages`), and a body that stalls runs out of
//! time one timeout after its last progress at most.
//!
//! Every enforcer reads the same figures: the serving core's watchdog, for
//! any call, and a backend's own means of stopping one (the plugin runtime's
//! epoch callback, for a call running WebAssembly code).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The slowest pace a body may move at and still earn time beyond the
/// timeout: slow links do far better, and a stall earns nothing.
pub const MIN_PACE_BYTES_PER_SEC: u64 = 1 << 20;

/// Bytes moved through a call's body stream so far.
#[derive(Clone, Default)]
pub struct Progress(Arc<AtomicU64>);

impl Progress {
    pub fn add(&self, bytes: usize) {
        self.0.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn moved(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    fn reset(&self) {
        self.0.store(0, Ordering::Relaxed);
    }
}

/// The limit of one call in progress.
#[derive(Clone)]
pub struct Deadline {
    started: Instant,
    timeout: Duration,
    progress: Progress,
}

impl Deadline {
    /// Starts timing a call whose body streams count into `progress`.
    pub fn start(timeout: Duration, progress: &Progress) -> Deadline {
        progress.reset();
        Deadline { started: Instant::now(), timeout, progress: progress.clone() }
    }

    /// When the call must have ended, given what it has moved so far.
    pub fn due(&self) -> Instant {
        let earned = Duration::from_secs_f64(self.progress.moved() as f64 / MIN_PACE_BYTES_PER_SEC as f64);
        self.started + self.timeout + earned
    }

    /// Time left, or `None` once the call is out of time.
    pub fn remaining(&self, now: Instant) -> Option<Duration> {
        self.due().checked_duration_since(now).filter(|d| !d.is_zero())
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_bytes_moved_buy_time() {
        let progress = Progress::default();
        let d = Deadline::start(Duration::from_secs(2), &progress);
        let start = d.started;
        assert_eq!(d.remaining(start + Duration::from_secs(1)), Some(Duration::from_secs(1)));
        assert_eq!(d.remaining(start + Duration::from_secs(3)), None);
        progress.add(4 << 20);
        assert_eq!(d.due(), start + Duration::from_secs(6), "4 MiB at the minimum pace earn 4 s");
        let again = Deadline::start(Duration::from_secs(2), &progress);
        assert_eq!(progress.moved(), 0, "a new call starts from nothing");
        assert!(again.remaining(again.started + Duration::from_secs(3)).is_none());
    }
}
