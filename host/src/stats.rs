//! Counters of what one run did, for `--verbose` and `--stats-json`.
//!
//! Updated from every thread with relaxed atomics: the figures are reported
//! once, at exit, and nothing branches on them.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use serde::Serialize;

use crate::plugin::ShutdownReport;

#[derive(Default)]
pub struct Stats {
    pub gets: AtomicU64,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    /// Hits answered from local disk without asking the plugin (the local
    /// tier, or a put of this session).
    pub hits_local: AtomicU64,
    /// Hits whose body the plugin supplied (it was not on local disk).
    pub hits_fetched: AtomicU64,
    /// Actions listed by a manifest found at the start (see `manifest`).
    pub manifest_items: AtomicU64,
    /// Outputs brought into the local tier ahead of the go command's
    /// requests, from that list (carried in it, or fetched from the plugin).
    pub prefetched: AtomicU64,
    pub hit_bytes: AtomicU64,
    pub puts: AtomicU64,
    pub put_bytes: AtomicU64,
    /// Puts whose bytes were already stored locally.
    pub puts_deduplicated: AtomicU64,
    /// Puts that could not be stored locally (answered with an error).
    pub put_failures: AtomicU64,
    /// Unavailable or broken answers from the plugin.
    pub plugin_errors: AtomicU64,
    /// Calls that trapped: a panic, an invalid operation, the memory limit.
    pub plugin_traps: AtomicU64,
    /// Calls stopped at their deadline (or given up on, if stuck in the host).
    pub plugin_timeouts: AtomicU64,
    /// Gets answered as misses without asking the plugin, while it was paused.
    pub skipped_while_paused: AtomicU64,
    /// Puts kept only locally because the plugin was paused.
    pub local_only_puts: AtomicU64,
    /// Puts kept only locally because too many were waiting to be recorded.
    pub puts_not_recorded: AtomicU64,
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
    pub hits_local: u64,
    pub hits_fetched: u64,
    pub manifest_items: u64,
    pub prefetched: u64,
    pub hit_bytes: u64,
    pub puts: u64,
    pub put_bytes: u64,
    pub puts_deduplicated: u64,
    pub put_failures: u64,
    pub plugin_errors: u64,
    pub plugin_traps: u64,
    pub plugin_timeouts: u64,
    /// Instances replaced after a trap or timeout.
    pub plugin_restarts: u64,
    /// Plugin threads given up on, stuck in a call beyond interruption.
    pub plugin_stuck: u64,
    /// Times repeated outages paused the plugin.
    pub breaker_trips: u64,
    /// Connections the plugin tried without a grant, refused by the sandbox.
    pub network_denials: u64,
    pub skipped_while_paused: u64,
    pub local_only_puts: u64,
    pub puts_not_recorded: u64,
    pub rejected_bodies: u64,
    pub plugin_ms: u64,
    pub wall_ms: u64,
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    pub fn summary(
        &self,
        plugin: &str,
        plugin_time: Duration,
        wall: Duration,
        shutdown: &ShutdownReport,
        breaker_trips: u64,
        network_denials: u64,
    ) -> Summary {
        Summary {
            plugin: plugin.to_string(),
            gets: self.gets.load(Relaxed),
            hits: self.hits.load(Relaxed),
            misses: self.misses.load(Relaxed),
            hits_local: self.hits_local.load(Relaxed),
            hits_fetched: self.hits_fetched.load(Relaxed),
            manifest_items: self.manifest_items.load(Relaxed),
            prefetched: self.prefetched.load(Relaxed),
            hit_bytes: self.hit_bytes.load(Relaxed),
            puts: self.puts.load(Relaxed),
            put_bytes: self.put_bytes.load(Relaxed),
            puts_deduplicated: self.puts_deduplicated.load(Relaxed),
            put_failures: self.put_failures.load(Relaxed),
            plugin_errors: self.plugin_errors.load(Relaxed),
            plugin_traps: self.plugin_traps.load(Relaxed),
            plugin_timeouts: self.plugin_timeouts.load(Relaxed),
            plugin_restarts: shutdown.restarts,
            plugin_stuck: shutdown.stuck as u64,
            breaker_trips,
            network_denials,
            skipped_while_paused: self.skipped_while_paused.load(Relaxed),
            local_only_puts: self.local_only_puts.load(Relaxed),
            puts_not_recorded: self.puts_not_recorded.load(Relaxed),
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
            self.plugin_errors + self.plugin_traps + self.plugin_timeouts + self.rejected_bodies,
            self.plugin_ms,
            self.wall_ms
        )
    }
}

fn human_bytes(n: u64) -> String {
    bytesize::ByteSize(n).display().iec().to_string()
}
