//! The opt-in request log (`--log-requests FILE`): one JSON line per request
//! of the go command, and one per put the backend recorded, saying what was
//! asked, what it came to, where it was served from, the bytes and the time.
//! For finding out what a remote cache costs and saves, build by build.
//!
//! Each line is written whole with one write to a file opened for appending,
//! so lines of concurrent threads (or of several go commands sharing the
//! file) never interleave, and a killed session loses no line already
//! answered. It must never write anywhere but its file, and a failure to
//! write is said once and never fails a request.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Instant, SystemTime};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::domain::{Digest, nanos};

/// One line.
#[derive(Serialize)]
pub struct Line {
    /// When it was answered (or recorded): milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// The request's ID; none for a recording, which answers no request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<i64>,
    /// `get`, `put`, or `record` (the backend storing a put, in the background).
    pub command: &'static str,
    pub action: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// The output's size, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// get: `hit` or `miss`; put: `stored` or `error`; record: `stored`,
    /// `failed`, or `skipped` (a later put of the action replaced it).
    pub result: &'static str,
    /// Where a get was answered from: `local` (this machine), `remote` (the
    /// backend had the entry; its body was here already), `fetched` (the body
    /// came from the backend), `paused` (the backend is paused after
    /// failures: not asked), `backend` (a miss the backend answered) or
    /// `failed` (the backend failed or hung: a miss).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<&'static str>,
    /// Bytes of bodies moved to or from the backend, as it stores them.
    pub remote_bytes: u64,
    /// From the request read to its answer (or the recording done), in ms.
    pub ms: f64,
}

impl Line {
    pub fn new(command: &'static str, action: &Digest, result: &'static str, since: Instant) -> Line {
        Line {
            time_ms: nanos(SystemTime::now()) / 1_000_000,
            id: None,
            command,
            action: hex::encode(action),
            output: None,
            size: None,
            result,
            from: None,
            remote_bytes: 0,
            ms: since.elapsed().as_secs_f64() * 1000.0,
        }
    }
}

/// The log, or nothing when it is off.
pub struct RequestLog {
    file: Option<Mutex<File>>,
    failed: AtomicBool,
}

impl RequestLog {
    pub fn off() -> RequestLog {
        RequestLog { file: None, failed: AtomicBool::new(false) }
    }

    /// Appends to `path`, creating it.
    pub fn open(path: &Path) -> Result<RequestLog> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("--log-requests {}", path.display()))?;
        Ok(RequestLog { file: Some(Mutex::new(file)), failed: AtomicBool::new(false) })
    }

    pub fn is_on(&self) -> bool {
        self.file.is_some()
    }

    /// Writes `line`; `Err` with what to say, the first time writing fails.
    pub fn write(&self, line: &Line) -> Result<(), String> {
        let Some(file) = &self.file else { return Ok(()) };
        let mut text = serde_json::to_string(line).expect("a line serializes");
        text.push('\n');
        match file.lock().unwrap().write_all(text.as_bytes()) {
            Ok(()) => Ok(()),
            Err(e) if !self.failed.swap(true, Ordering::Relaxed) => Err(format!("request log: {e}")),
            Err(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_appended_whole_as_json() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("requests.jsonl");
        std::fs::write(&path, "earlier\n").unwrap();
        let log = RequestLog::open(&path).unwrap();
        let mut line = Line::new("get", &[1; 32], "hit", Instant::now());
        line.id = Some(7);
        line.from = Some("fetched");
        line.remote_bytes = 99;
        log.write(&line).unwrap();
        log.write(&Line::new("record", &[2; 32], "stored", Instant::now())).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "earlier");
        let get: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(
            (get["id"].as_i64(), get["from"].as_str(), get["remote_bytes"].as_u64()),
            (Some(7), Some("fetched"), Some(99))
        );
        assert_eq!(get["action"], hex::encode([1; 32]));
        let record: serde_json::Value = serde_json::from_str(lines[2]).unwrap();
        assert!(record.get("id").is_none() && record["command"] == "record");
        assert!(!RequestLog::off().is_on());
        assert!(RequestLog::open(&dir.path().join("no/such/dir/log")).is_err(), "a mistake fails the start");
    }
}
