//! Counters of what one run did, for `--verbose` and `--stats-json`.
//!
//! Updated from every thread with relaxed atomics: the figures are reported
//! once, at exit, and nothing branches on them.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use serde::Serialize;

#[derive(Default)]
pub struct Stats {
    pub gets: AtomicU64,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    /// Hits whose body the plugin supplied (it was not on local disk).
    pub hits_fetched: AtomicU64,
    pub hit_bytes: AtomicU64,
    pub puts: AtomicU64,
    pub put_bytes: AtomicU64,
    /// Puts whose bytes were already stored locally.
    pub puts_deduplicated: AtomicU64,
    /// Puts that could not be stored locally (answered with an error).
    pub put_failures: AtomicU64,
    /// Unavailable or broken answers and traps from the plugin.
    pub plugin_errors: AtomicU64,
    pub plugin_traps: AtomicU64,
    /// Bodies from the plugin rejected for a wrong hash or size.
    pub rejected_bodies: AtomicU64,
}

/// The figures as reported; field names are the JSON keys.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Summary {
    pub plugin: String,
    pub gets: u64,
    pub hits: u64,
    pub misses: u64,
    pub hits_fetched: u64,
    pub hit_bytes: u64,
    pub puts: u64,
    pub put_bytes: u64,
    pub puts_deduplicated: u64,
    pub put_failures: u64,
    pub plugin_errors: u64,
    pub plugin_traps: u64,
    pub plugin_restarts: u64,
    pub rejected_bodies: u64,
    pub plugin_ms: u64,
    pub wall_ms: u64,
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    pub fn summary(&self, plugin: &str, plugin_time: Duration, restarts: u64, wall: Duration) -> Summary {
        Summary {
            plugin: plugin.to_string(),
            gets: self.gets.load(Relaxed),
            hits: self.hits.load(Relaxed),
            misses: self.misses.load(Relaxed),
            hits_fetched: self.hits_fetched.load(Relaxed),
            hit_bytes: self.hit_bytes.load(Relaxed),
            puts: self.puts.load(Relaxed),
            put_bytes: self.put_bytes.load(Relaxed),
            puts_deduplicated: self.puts_deduplicated.load(Relaxed),
            put_failures: self.put_failures.load(Relaxed),
            plugin_errors: self.plugin_errors.load(Relaxed),
            plugin_traps: self.plugin_traps.load(Relaxed),
            plugin_restarts: restarts,
            rejected_bodies: self.rejected_bodies.load(Relaxed),
            plugin_ms: plugin_time.as_millis() as u64,
            wall_ms: wall.as_millis() as u64,
        }
    }
}

impl Summary {
    /// The one line `--verbose` prints at exit.
    pub fn line(&self) -> String {
        format!(
            "gocp: plugin {}: {} gets ({} hits, {} misses), {} puts ({}), {} plugin errors, {} ms in plugin, {} ms total",
            self.plugin,
            self.gets,
            self.hits,
            self.misses,
            self.puts,
            human_bytes(self.put_bytes),
            self.plugin_errors + self.plugin_traps + self.rejected_bodies,
            self.plugin_ms,
            self.wall_ms
        )
    }
}

fn human_bytes(n: u64) -> String {
    bytesize::ByteSize(n).display().iec().to_string()
}
