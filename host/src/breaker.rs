//! A circuit breaker for the plugin: after repeated outages (a backend down,
//! calls timing out), stop calling it for a while so the build runs at local
//! speed instead of paying a timeout per request; then try again, waiting
//! twice as long after each new failure.
//!
//! It owns only that decision; it knows nothing of requests or plugins.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Consecutive outages that open the circuit.
const THRESHOLD: u32 = 5;
const FIRST_PAUSE: Duration = Duration::from_secs(1);
const LONGEST_PAUSE: Duration = Duration::from_secs(60);

pub struct Breaker {
    state: Mutex<State>,
}

struct State {
    consecutive: u32,
    open_until: Option<Instant>,
    next_pause: Duration,
    trips: u64,
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker { state: Mutex::new(State { consecutive: 0, open_until: None, next_pause: FIRST_PAUSE, trips: 0 }) }
    }
}

impl Breaker {
    /// Whether the plugin may be called now. After a pause, calls go through
    /// again; the first result decides whether the circuit closes.
    pub fn allows(&self) -> bool {
        self.allows_at(Instant::now())
    }

    fn allows_at(&self, now: Instant) -> bool {
        let state = self.state.lock().unwrap();
        state.open_until.is_none_or(|until| now >= until)
    }

    pub fn success(&self) {
        let mut state = self.state.lock().unwrap();
        state.consecutive = 0;
        state.open_until = None;
        state.next_pause = FIRST_PAUSE;
    }

    /// Records an outage. Returns the pause if this one opened the circuit.
    pub fn outage(&self) -> Option<Duration> {
        self.outage_at(Instant::now())
    }

    fn outage_at(&self, now: Instant) -> Option<Duration> {
        let mut state = self.state.lock().unwrap();
        state.consecutive += 1;
        let paused = state.open_until.is_some_and(|until| now < until);
        // Trips at the threshold, and again on any failure after a pause.
        let trips = !paused
            && (state.consecutive == THRESHOLD || (state.consecutive > THRESHOLD && state.open_until.is_some()));
        if !trips {
            return None;
        }
        let pause = state.next_pause;
        state.open_until = Some(now + pause);
        state.next_pause = (pause * 2).min(LONGEST_PAUSE);
        state.trips += 1;
        Some(pause)
    }

    pub fn trips(&self) -> u64 {
        self.state.lock().unwrap().trips
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_repeated_outages_and_backs_off() {
        let b = Breaker::default();
        let t0 = Instant::now();
        for _ in 0..THRESHOLD - 1 {
            assert_eq!(b.outage_at(t0), None);
            assert!(b.allows_at(t0));
        }
        assert_eq!(b.outage_at(t0), Some(FIRST_PAUSE));
        assert!(!b.allows_at(t0 + FIRST_PAUSE / 2), "paused");
        // Failures of calls already in flight while paused change nothing.
        assert_eq!(b.outage_at(t0 + FIRST_PAUSE / 2), None);
        let t1 = t0 + FIRST_PAUSE;
        assert!(b.allows_at(t1), "tries again after the pause");
        assert_eq!(b.outage_at(t1), Some(FIRST_PAUSE * 2), "a failed retry pauses twice as long");
        assert!(b.allows_at(t1 + FIRST_PAUSE * 2));
        b.success();
        assert!(b.allows_at(t1 + FIRST_PAUSE * 2));
        assert_eq!(b.trips(), 2);
        for _ in 0..THRESHOLD - 1 {
            assert_eq!(b.outage_at(t1), None, "a success resets the count");
        }
    }

    #[test]
    fn pauses_are_capped() {
        let b = Breaker::default();
        let mut now = Instant::now();
        let mut last = Duration::ZERO;
        for _ in 0..THRESHOLD - 1 {
            b.outage_at(now);
        }
        for _ in 0..20 {
            if let Some(p) = b.outage_at(now) {
                last = p;
                now += p;
            }
        }
        assert_eq!(last, LONGEST_PAUSE);
    }
}
