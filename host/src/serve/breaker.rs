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
    /// The plugin could not even be started: no call for the whole session.
    held: bool,
    consecutive: u32,
    open: Option<Open>,
    next_pause: Duration,
    trips: u64,
}

/// The circuit is open: calls wait until `until`, then one call goes through
/// as a probe, and the next may follow only a pause later.
struct Open {
    until: Instant,
    pause: Duration,
    /// A probe was let through; its failure opens the circuit for longer.
    probing: bool,
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker {
            state: Mutex::new(State { held: false, consecutive: 0, open: None, next_pause: FIRST_PAUSE, trips: 0 }),
        }
    }
}

impl Breaker {
    /// Whether the plugin may be called now. After a pause one caller is let
    /// through as a probe, and then one per pause: with the backend still
    /// down, a slow failure (a connect timeout) then holds up one request,
    /// not every request in flight.
    pub fn allows(&self) -> bool {
        self.allows_at(Instant::now())
    }

    fn allows_at(&self, now: Instant) -> bool {
        let mut state = self.state.lock().unwrap();
        if state.held {
            return false;
        }
        match &mut state.open {
            None => true,
            Some(open) if now < open.until => false,
            Some(open) => {
                open.until = now + open.pause;
                open.probing = true;
                true
            }
        }
    }

    /// Whether calls are being held back now. Unlike [`Breaker::allows`] it
    /// never lets a probe through: for decisions made before the call itself.
    pub fn paused(&self) -> bool {
        let state = self.state.lock().unwrap();
        state.held || state.open.as_ref().is_some_and(|open| Instant::now() < open.until)
    }

    /// Holds every call back for good: for a plugin that could not be started.
    pub fn hold(&self) {
        self.state.lock().unwrap().held = true;
    }

    pub fn success(&self) {
        let mut state = self.state.lock().unwrap();
        state.consecutive = 0;
        state.open = None;
        state.next_pause = FIRST_PAUSE;
    }

    /// Records an outage. Returns the pause if this one opened the circuit.
    pub fn outage(&self) -> Option<Duration> {
        self.outage_at(Instant::now())
    }

    fn outage_at(&self, now: Instant) -> Option<Duration> {
        let mut state = self.state.lock().unwrap();
        state.consecutive += 1;
        let trips = match &state.open {
            None => state.consecutive >= THRESHOLD,
            // A failed probe opens it again, for longer; calls that were
            // already in flight when it opened change nothing.
            Some(open) => open.probing,
        };
        if !trips {
            return None;
        }
        let pause = state.next_pause;
        state.open = Some(Open { until: now + pause, pause, probing: false });
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
        assert!(b.allows_at(t1), "one probe after the pause");
        assert!(!b.allows_at(t1), "only one");
        assert_eq!(b.outage_at(t1), Some(FIRST_PAUSE * 2), "a failed probe pauses twice as long");
        assert!(!b.allows_at(t1 + FIRST_PAUSE));
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
                assert!(b.allows_at(now), "a probe after each pause");
            }
        }
        assert_eq!(last, LONGEST_PAUSE);
    }
}
