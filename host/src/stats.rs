//! The figures of one run, for `--verbose`, `--stats-json` and the benchmark.
//!
//! Every figure is a counter declared once, in the list below, with its
//! meaning: that one line makes it a field to add to, a key of
//! `--stats-json` (its name), and part of the `--verbose` line when it is
//! not zero. Counters are relaxed atomics updated from every thread: they are
//! read once, at exit, and nothing branches on them.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::Serialize;

/// A figure that only grows.
#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

macro_rules! counters {
    ($($(#[doc = $doc:literal])* $name:ident,)*) => {
        /// The counters of one run.
        #[derive(Default)]
        pub struct Stats {
            $($(#[doc = $doc])* pub $name: Counter,)*
        }

        /// The counters' values at one moment; field names are the JSON keys.
        #[derive(Debug, Default, Serialize, PartialEq, Eq, Clone)]
        pub struct Counts {
            $(pub $name: u64,)*
        }

        impl Stats {
            pub fn counts(&self) -> Counts {
                Counts { $($name: self.$name.get(),)* }
            }
        }

        impl Counts {
            /// Every counter by name, in the order declared.
            pub fn named(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name),)*]
            }
        }
    };
}

counters! {
    /// Get requests.
    gets,
    hits,
    misses,
    /// Hits answered from this machine without asking the backend (the local
    /// tier, or a put of this session).
    hits_local,
    /// Hits whose body the backend supplied (it was not on this machine).
    hits_fetched,
    /// Actions listed by a manifest found at the start (see `manifest`).
    manifest_items,
    /// Outputs brought into the local tier ahead of the go command's
    /// requests, from that list (carried in it, or fetched from the backend).
    prefetched,
    hit_bytes,
    puts,
    put_bytes,
    /// Puts whose bytes were already stored locally.
    puts_deduplicated,
    /// Puts that could not be stored locally (answered with an error).
    put_failures,
    /// Unavailable or broken answers from the backend.
    plugin_errors,
    /// Calls that trapped: a panic, an invalid operation, the memory limit.
    plugin_traps,
    /// Calls stopped at their deadline (or given up on, if stuck in the host).
    plugin_timeouts,
    /// Instances replaced after a trap or timeout.
    plugin_restarts,
    /// Threads given up on, stuck in a call beyond interruption.
    plugin_stuck,
    /// Times repeated outages paused the backend.
    breaker_trips,
    /// Connections the backend tried without a grant, refused by the sandbox.
    network_denials,
    /// Gets answered as misses without asking the backend, while it was paused.
    skipped_while_paused,
    /// Gets answered as misses before the backend answered, during a streak
    /// of lookups it had nothing for (see `--miss-streak`), and those of them
    /// it turned out to have.
    misses_early,
    misses_early_found,
    /// Puts kept only locally because the backend was paused.
    local_only_puts,
    /// Puts kept only locally because too many were waiting to be recorded.
    puts_not_recorded,
    /// Bodies from the backend rejected for a wrong hash or size.
    rejected_bodies,
    /// Entries from the backend no trusted key signed (see `trust`): misses.
    untrusted_entries,
    /// Bodies small enough to travel inside their entries, so not sent on
    /// their own (see `host_data`).
    inline_bodies,
    /// Bytes of bodies sent to the backend, as it stores them (compressed,
    /// when they are; inside their entries, for the small ones).
    remote_bytes_up,
    /// Bytes of bodies received from the backend, as it stores them.
    remote_bytes_down,
    /// Time the go command's gets spent waiting on the backend (lookups of
    /// misses included); background work is not counted.
    remote_wait_ms,
    /// Connections the plugin's wasi:http requests opened, and the requests
    /// sent over them (a connection is reused while it stays open).
    http_connections,
    http_requests,
    /// Time spent inside backend calls.
    plugin_ms,
    /// The whole session.
    wall_ms,
}

/// The figures as reported: which backend, and every counter.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Summary {
    pub plugin: String,
    #[serde(flatten)]
    pub counts: Counts,
}

/// Counters the sentence of `--verbose` already says.
const IN_THE_SENTENCE: &[&str] = &[
    "gets",
    "hits",
    "misses",
    "puts",
    "put_bytes",
    "plugin_errors",
    "plugin_traps",
    "plugin_timeouts",
    "rejected_bodies",
    "plugin_ms",
    "wall_ms",
];

impl Summary {
    /// The one line `--verbose` prints at exit: the usual sentence, then any
    /// other counter that is not zero.
    pub fn line(&self) -> String {
        let c = &self.counts;
        let mut line = format!(
            "gocp: plugin {}: {} gets ({} hits, {} misses), {} puts ({}), {} plugin errors, {} ms in plugin, {} ms total",
            self.plugin,
            c.gets,
            c.hits,
            c.misses,
            c.puts,
            human_bytes(c.put_bytes),
            c.plugin_errors + c.plugin_traps + c.plugin_timeouts + c.rejected_bodies,
            c.plugin_ms,
            c.wall_ms
        );
        for (name, value) in c.named() {
            if value != 0 && !IN_THE_SENTENCE.contains(&name) {
                line.push_str(&format!("; {} {value}", name.replace('_', " ")));
            }
        }
        line
    }
}

fn human_bytes(n: u64) -> String {
    bytesize::ByteSize(n).display().iec().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_counter_reaches_json_and_the_verbose_line() {
        let stats = Stats::default();
        stats.gets.add(3);
        stats.hits.add(2);
        stats.prefetched.add(7);
        let summary = Summary { plugin: "disk 0.1.0".into(), counts: stats.counts() };
        let json = serde_json::to_value(&summary).unwrap();
        assert_eq!(json["prefetched"], 7);
        assert_eq!(json["plugin"], "disk 0.1.0");
        assert_eq!(json.as_object().unwrap().len(), 1 + summary.counts.named().len());
        let line = summary.line();
        assert!(line.starts_with("gocp: plugin disk 0.1.0: 3 gets (2 hits, 0 misses)"), "{line}");
        assert!(line.ends_with("; prefetched 7"), "{line}");
    }
}
