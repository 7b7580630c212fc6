//! Whether a get may be answered as a miss before the backend answers.
//!
//! On the machine that fills a cache (a cold build, or one after a change
//! deep in the module graph) nearly every lookup is a miss, and the go
//! command waits a round trip on each before it starts compiling: on a link
//! 20 ms away, a cold `go build std` spends about a third of its time there.
//! Once the backend has answered [`MissStreak::after`] lookups in a row with
//! "not found", or lookups in a row not found have kept the go command
//! waiting [`MissStreak::wait`] in all, a get it would have to look up is
//! answered as a miss at once and looked up anyway, in the background; the
//! first one found ends the streak, so a build that reaches actions the cache
//! has waits again. A get answered early that the backend had costs one
//! compile, where waiting on every miss costs a round trip each.
//!
//! The time trigger is what makes a far remote cheap to fill: 32 lookups are
//! a second of waiting 30 ms away and 10 ms on a LAN, so the count alone
//! either waits too long on the first or guesses too soon on the second.
//!
//! The streak's first [`MissStreak::after`] early gets are all looked up,
//! then one in two, one in three, and so on, at most one in [`MAX_STRIDE`]:
//! a cache that has the rest of the build is still noticed within a few
//! gets, and a cold build does not send a request for every action it builds.
//!
//! It only counts; it never answers a request, and never changes what is
//! stored.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

/// Long enough that a cache holding most of a build rarely starts a streak
/// (its misses come scattered among hits), short enough that a cold
/// `go build std`, about 700 lookups, waits on few of them.
pub const DEFAULT: usize = 32;

/// Waiting on misses in a row the go command pays before gets are answered
/// early: three or four lookups 20-30 ms away, more than a cold `go build std`
/// waits in all on loopback. A false start costs a compile or two (the next
/// lookup found ends it); this much waiting is less than one compile.
pub const DEFAULT_WAIT: Duration = Duration::from_millis(100);

pub(super) struct MissStreak {
    /// Lookups in a row not found that start the streak; 0: never.
    after: usize,
    /// Waiting on lookups in a row not found that starts it; zero: only
    /// the count does.
    wait: Duration,
    /// Lookups not found since the last one found.
    run: AtomicUsize,
    /// Nanoseconds the go command waited on them.
    waited: AtomicU64,
    /// Gets answered early since the last lookup found.
    early: AtomicUsize,
}

/// The fewest early gets looked up: one in this many.
const MAX_STRIDE: usize = 8;

impl MissStreak {
    pub fn new(after: usize, wait: Duration) -> MissStreak {
        MissStreak { after, wait, run: AtomicUsize::new(0), waited: AtomicU64::new(0), early: AtomicUsize::new(0) }
    }

    /// Whether gets that need a lookup are answered as misses now.
    pub fn answering_early(&self) -> bool {
        self.after > 0
            && (self.run.load(Ordering::Relaxed) >= self.after
                || (!self.wait.is_zero() && self.waited.load(Ordering::Relaxed) >= self.wait.as_nanos() as u64))
    }

    /// Whether a get answered early is looked up too.
    pub fn look_up_early(&self) -> bool {
        let n = self.early.fetch_add(1, Ordering::Relaxed);
        n.is_multiple_of((n / self.after.max(1)).clamp(1, MAX_STRIDE))
    }

    /// The backend did not have an action's entry; the go command waited
    /// `waited` for that answer (nothing for a get answered early).
    pub fn not_found(&self, waited: Duration) {
        self.run.fetch_add(1, Ordering::Relaxed);
        self.waited.fetch_add(waited.as_nanos() as u64, Ordering::Relaxed);
    }

    /// The backend had an action's entry: gets wait for lookups again.
    pub fn found(&self) {
        self.run.store(0, Ordering::Relaxed);
        self.waited.store(0, Ordering::Relaxed);
        self.early.store(0, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_after_a_run_of_misses_and_ends_at_the_first_hit() {
        let streak = MissStreak::new(3, Duration::ZERO);
        streak.not_found(Duration::from_secs(1));
        streak.not_found(Duration::ZERO);
        assert!(!streak.answering_early());
        streak.not_found(Duration::ZERO);
        assert!(streak.answering_early());
        streak.found();
        assert!(!streak.answering_early());
        (0..3).for_each(|_| streak.not_found(Duration::ZERO));
        let looked_up = (0..60).filter(|_| streak.look_up_early()).count();
        // Every one of the first 6, then one in 2 up to the 9th, one in 3 up
        // to the 12th, ..., one in 8 from the 24th on: 6, 8, 9, 12, ..., 24, 32, ..., 56.
        assert_eq!(looked_up, 6 + 2 + 1 + 1 + 1 + 1 + 1 + 5, "{looked_up}");
        let never = MissStreak::new(0, DEFAULT_WAIT);
        (0..100).for_each(|_| never.not_found(Duration::from_secs(1)));
        assert!(!never.answering_early());
    }

    #[test]
    fn a_far_remote_starts_it_after_its_misses_cost_the_wait() {
        let streak = MissStreak::new(DEFAULT, Duration::from_millis(100));
        (0..3).for_each(|_| streak.not_found(Duration::from_millis(30)));
        assert!(!streak.answering_early(), "90 ms waited");
        streak.not_found(Duration::from_millis(30));
        assert!(streak.answering_early(), "120 ms waited");
        // A hit ends it, and the waiting counts again from nothing.
        streak.found();
        streak.not_found(Duration::from_millis(90));
        assert!(!streak.answering_early());
        // Misses close by start it only by their count.
        let near = MissStreak::new(DEFAULT, Duration::from_millis(100));
        (0..DEFAULT - 1).for_each(|_| near.not_found(Duration::from_micros(300)));
        assert!(!near.answering_early());
        near.not_found(Duration::from_micros(300));
        assert!(near.answering_early());
    }
}
