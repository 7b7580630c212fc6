//! The user's build output: one line on stderr per kind of real problem.
//!
//! stderr is the go command's own output, so a failing backend must not
//! print a line per request: the first problem of each kind is said, with
//! what it means for the build, and later ones are only counted (in
//! `--stats-json`). Every message is made one safe line here, whatever text
//! a backend put in it.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::text;

/// The kinds of trouble worth one line.
#[derive(Clone, Copy)]
pub enum Problem {
    /// The backend failed, misbehaved or was refused something.
    Backend,
    /// The local store (a full or read-only disk).
    Store,
    /// Entries no trusted key signed.
    Trust,
}

pub struct Problems {
    backend_name: String,
    seen: [AtomicU64; 3],
}

impl Problems {
    pub fn new(backend_name: &str) -> Self {
        Problems { backend_name: backend_name.to_string(), seen: Default::default() }
    }

    pub fn report(&self, kind: Problem, message: String) {
        if self.seen[kind as usize].fetch_add(1, Ordering::Relaxed) > 0 {
            return;
        }
        // A trap's message (a backtrace with the plugin's own function
        // names) spans lines; backend text arrives already cleaned.
        let message = text::one_line(&message);
        match kind {
            Problem::Backend => eprintln!(
                "gocp: plugin {}: {message} (the build goes on without it; later errors are only counted)",
                self.backend_name
            ),
            Problem::Store => eprintln!("gocp: {message} (the build goes on; later errors are only counted)"),
            Problem::Trust => eprintln!("gocp: plugin {}: {message}", self.backend_name),
        }
    }
}
