//! Receiving a put: its body is decoded from the go command's stream (while
//! the thread holds the input) straight into the local store, hashed on the
//! way, kept under its output id if it matches, and the put is answered with
//! that file at once. What is left, having the backend record it, goes to
//! `record`.
//!
//! It answers every put it reads exactly once, and an error only when
//! nothing could be stored (an answer without a DiskPath fails the go
//! command's package loading).

use std::io;
use std::path::PathBuf;
use std::time::Instant;

use super::record::Recording;
use super::request_log::Line;
use super::{Input, Next, Problem, Session, path_string};
use crate::domain::{Digest, Entry, now_ns};
use crate::local::store::CommitError;
use crate::protocol::{Body, DecodeError, Response};

/// Receives a put and answers it; what is left for the backend to record,
/// if anything. `Err` only when the input itself broke.
pub(super) fn receive(
    session: &Session,
    input: &mut Input,
    id: i64,
    action_id: Digest,
    output_id: Digest,
    size: u64,
) -> Result<Next, DecodeError> {
    let received = Instant::now();
    session.stats.puts.add(1);
    session.stats.put_bytes.add(size);
    let stored = match session.local.store.lookup(&output_id, size) {
        // The same bytes are stored already (another action, or another go
        // command): read past the body without writing it again.
        Some(path) => match input.read_body(id, size, &mut io::sink())? {
            Body::Complete => {
                session.stats.puts_deduplicated.add(1);
                Stored::At(path)
            }
            Body::Bad(e) => Stored::Failed(e.to_string()),
            Body::SinkFailed(e) => Stored::Failed(e.to_string()),
        },
        None => store(session, input, id, &output_id, size)?,
    };
    let path = match stored {
        Stored::At(path) => path,
        Stored::Failed(message) => {
            session.stats.put_failures.add(1);
            session.responder.send(&Response::error(id, message));
            log(session, id, &action_id, &output_id, size, "error", received);
            return Ok(Next::Nothing);
        }
    };
    let entry = Entry { output_id, size, put_time_ns: now_ns() };
    session.responder.send(&Response { id, disk_path: Some(path_string(path)), ..Default::default() });
    log(session, id, &action_id, &output_id, size, "stored", received);
    session.remember(&action_id, &entry);
    session.prefetch.note_put(&action_id, &entry);
    // Not `allows`: a probe is let through when the put is recorded.
    if session.breaker.paused() || session.read_only {
        session.stats.local_only_puts.add(1);
        return Ok(Next::Nothing);
    }
    session.local.pend(&action_id, &entry);
    Ok(Next::Record(Recording { action_id, entry, seq: session.backlog.next_seq() }))
}

/// A put's line in the request log.
fn log(
    session: &Session,
    id: i64,
    action_id: &Digest,
    output_id: &Digest,
    size: u64,
    result: &'static str,
    received: Instant,
) {
    if session.log.is_on() {
        let mut line = Line::new("put", action_id, result, received);
        (line.id, line.output, line.size) = (Some(id), Some(hex::encode(output_id)), Some(size));
        session.log_line(&line);
    }
}

/// What became of a put's body.
enum Stored {
    At(PathBuf),
    /// Nothing was stored: the answer to the go command says why.
    Failed(String),
}

/// Decodes a put's body into the local store. `Err` only when the input
/// itself broke.
fn store(session: &Session, input: &mut Input, id: i64, output_id: &Digest, size: u64) -> Result<Stored, DecodeError> {
    let store = &session.local.store;
    let mut writer = match store.begin() {
        Ok(w) => w,
        Err(e) => {
            session.problems.report(Problem::Store, format!("local store: {e}"));
            // The put fails either way; its body only has to be read past.
            input.read_body(id, size, &mut io::sink())?;
            return Ok(Stored::Failed(format!("gocp local store: {e}")));
        }
    };
    match input.read_body(id, size, &mut writer)? {
        Body::Complete => {}
        Body::Bad(e) => return Ok(Stored::Failed(e.to_string())),
        Body::SinkFailed(e) => {
            session.problems.report(Problem::Store, format!("local store: storing body: {e}"));
            return Ok(Stored::Failed(format!("gocp local store: {e}")));
        }
    }
    Ok(match store.commit(writer, output_id, size) {
        Ok(path) => Stored::At(path),
        Err(CommitError::Io(e)) => {
            session.problems.report(Problem::Store, format!("local store: {e}"));
            Stored::Failed(format!("gocp local store: {e}"))
        }
        Err(e) => Stored::Failed(e.to_string()),
    })
}
