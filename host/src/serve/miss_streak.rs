//! Whether a get may be answered as a miss before the backend answers.
//!
//! On the machine that fills a cache (a cold build, or one after a change
//! deep in the module graph) nearly every lookup is a miss, and the go
//! command waits a round trip on each before it starts compiling: on a link
//! 20 ms away, a cold `go build std` spends about a third of its time there.
//! Once the backend has answered [`MissStreak::after`] lookups in a row with
//! "not found", a get it would have to look up is answered as a miss at once
//! and looked up anyway, in the background; the first one found ends the
//! streak, so a build that reaches actions the cache has waits again. A get
//! answered early that the backend had costs one compile, where waiting on
//! every miss costs a round trip each.
//!
//! The streak's first [`MissStreak::after`] early gets are all looked up,
//! then one in two, one in three, and so on, at most one in [`MAX_STRIDE`]:
//! a cache that has the rest of the build is still noticed within a few
//! gets, and a cold build does not send a request for every action it builds.
//!
//! It only counts; it never answers a request, and never changes what is
//! stored.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Long enough that a cache holding most of a build rarely starts a streak
/// (its misses come scattered among hits), short enough that a cold
/// `go build std`, about 700 lookups, waits on few of them.
pub const DEFAULT: usize = 32;

pub(super) struct MissStreak {
    /// Lookups in a row not found that start the streak; 0: never.
    after: usize,
    /// Lookups not found since the last one found.
    run: AtomicUsize,
    /// Gets answered early since the last lookup found.
    early: AtomicUsize,
}

/// The fewest early gets looked up: one in this many.
const MAX_STRIDE: usize = 8;

impl MissStreak {
    pub fn new(after: usize) -> MissStreak {
        MissStreak { after, run: AtomicUsize::new(0), early: AtomicUsize::new(0) }
    }

    /// Whether gets that need a lookup are answered as misses now.
    pub fn answering_early(&self) -> bool {
        self.after > 0 && self.run.load(Ordering::Relaxed) >= self.after
    }

    /// Whether a get answered early is looked up too.
    pub fn look_up_early(&self) -> bool {
        let n = self.early.fetch_add(1, Ordering::Relaxed);
        n.is_multiple_of((n / self.after.max(1)).clamp(1, MAX_STRIDE))
    }

    /// The backend did not have an action's entry.
    pub fn not_found(&self) {
        self.run.fetch_add(1, Ordering::Relaxed);
    }

    /// The backend had an action's entry: gets wait for lookups again.
    pub fn found(&self) {
        self.run.store(0, Ordering::Relaxed);
        self.early.store(0, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_after_a_run_of_misses_and_ends_at_the_first_hit() {
        let streak = MissStreak::new(3);
        streak.not_found();
        streak.not_found();
        assert!(!streak.answering_early());
        streak.not_found();
        assert!(streak.answering_early());
        streak.found();
        assert!(!streak.answering_early());
        (0..3).for_each(|_| streak.not_found());
        let looked_up = (0..60).filter(|_| streak.look_up_early()).count();
        // Every one of the first 6, then one in 2 up to the 9th, one in 3 up
        // to the 12th, ..., one in 8 from the 24th on: 6, 8, 9, 12, ..., 24, 32, ..., 56.
        assert_eq!(looked_up, 6 + 2 + 1 + 1 + 1 + 1 + 1 + 5, "{looked_up}");
        let never = MissStreak::new(0);
        (0..100).for_each(|_| never.not_found());
        assert!(!never.answering_early());
    }
}
