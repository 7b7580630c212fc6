//! Running one child process to its end within a time limit: its stderr
//! collected (a thread drains it, so a talkative child never blocks on a full
//! pipe), its wall time measured from spawn to exit, and the child killed
//! when the limit passes.
//!
//! It owns only the waiting. It never decides what a command means, never
//! retries, and never leaves a child it started running past its limit.

use std::io::Read;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// What a finished child left.
pub struct Finished {
    pub status: ExitStatus,
    pub stderr: String,
    /// From spawn to exit.
    pub took: Duration,
}

/// Runs `cmd` (stdout discarded, stderr captured) for at most `limit`.
/// Polling every 2 ms keeps the measured time within 2 ms of the exit.
pub fn run(cmd: &mut Command, what: &str, limit: Duration) -> Result<Finished> {
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("starting {what}"))?;
    let mut pipe = child.stderr.take().expect("stderr is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        let _ = tx.send(String::from_utf8_lossy(&buf).into_owned());
    });
    let deadline = started + limit;
    let status = loop {
        if let Some(status) = child.try_wait().with_context(|| format!("waiting for {what}"))? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} took longer than {} s: killed", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let took = started.elapsed();
    // The pipe ends when every holder has exited: a grandchild still holding
    // it (a GOCACHEPROG helper finishing after the go command) gets a while.
    let stderr = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_default();
    Ok(Finished { status, stderr, took })
}

/// The last `n` lines of `text`, for an error message.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
