//! Trimming the local tier in a process of its own, so that no go command
//! waits for it.
//!
//! A trim lists every body in the store: with a million of them that takes
//! seconds, and the go command waits for its helper's answer to `close`
//! before it exits (and kills the helper once it has it). So a session that
//! ends with a trim due claims it and starts its own command line with
//! `trim --detached` added, in a process group of its own, at low priority,
//! and answers at once. That process (the `trim` command in `cli`) also runs
//! the plugin's housekeeping (its `finish`, unless the session was
//! `--read-only`) until the plugin has none left, so a plugin that trims in
//! bounded steps (the disk plugin) finishes its pass there rather than a step
//! per go command. Only if that process cannot be started does the session
//! trim the store itself before answering, as it always used to.
//!
//! `objects/trim.lock` is held from the moment the trim is claimed until the
//! trim is done: the session locks it and hands the locked file to the
//! trimming process as its stdin (a `flock` belongs to the open file, which
//! the child shares), so `gocp-host trim` and tests can wait for a trim that
//! a session started, with no moment where it looks finished. A trim that
//! fails writes why in `objects/trim-error`; the next session that starts a
//! trim says it, once.
//!
//! It owns those two files and the trimming process; what a trim removes is
//! `Store::trim_now`'s and `LocalEntries::trim`'s to decide.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use rustix::fs::{FlockOperation, flock};

use super::entries::LocalEntries;
use super::sessions;
use super::store::{Store, TrimPolicy, TrimReport};

/// Niceness of the trimming process: builds running meanwhile come first.
const NICENESS: i32 = 10;

fn lock_path(state_dir: &Path) -> PathBuf {
    state_dir.join("objects").join("trim.lock")
}

fn error_path(state_dir: &Path) -> PathBuf {
    state_dir.join("objects").join("trim-error")
}

fn open_lock(state_dir: &Path) -> io::Result<File> {
    OpenOptions::new().read(true).write(true).create(true).truncate(false).open(lock_path(state_dir))
}

/// Starts a claimed trim in the background: this process's command line with
/// `trim --detached` added. When that cannot start (an executable the kernel
/// cannot run again, as under an emulator), trims here instead. `Err` says
/// what went wrong, for one line to the user: this trim, or the last
/// background one (reported once).
pub fn start(state_dir: &Path, policy: &TrimPolicy) -> Result<(), String> {
    let last_error = fs::read_to_string(error_path(state_dir)).ok().filter(|e| !e.trim().is_empty());
    if last_error.is_some() {
        let _ = fs::remove_file(error_path(state_dir));
    }
    let lock =
        open_lock(state_dir).map_err(|e| format!("trimming: opening {}: {e}", lock_path(state_dir).display()))?;
    if flock(&lock, FlockOperation::NonBlockingLockExclusive).is_err() {
        // The last trim is still running: this one is not needed.
        return last_error.map_or(Ok(()), Err);
    }
    // The session's own arguments (and its inherited environment), so the
    // trim has its limits and the plugin with its configuration and grants.
    let spawned = lock.try_clone().and_then(|held| {
        Command::new(std::env::current_exe()?)
            .args(std::env::args_os().skip(1))
            .args(["trim", "--detached"])
            .stdin(Stdio::from(held))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Not in the go command's process group: nothing sent to the
            // build reaches it.
            .process_group(0)
            .spawn()
    });
    if spawned.is_err() {
        trim_now(state_dir, policy)?;
    }
    last_error.map_or(Ok(()), Err)
}

/// `gocp-host trim`: trims the store of `state_dir` now, and its local
/// entries if it has any. Detached (started by [`start`]), the lock is
/// already held through stdin and a failure goes to `objects/trim-error`;
/// otherwise it waits for a trim in progress, then trims.
pub fn run(state_dir: &Path, policy: &TrimPolicy, detached: bool) -> Result<TrimReport, String> {
    let _held = if detached {
        // Only speed is at stake.
        let _ = rustix::process::nice(NICENESS);
        None
    } else {
        if !state_dir.join("objects").is_dir() {
            return Err(format!("{} holds no local store", state_dir.display()));
        }
        let lock = open_lock(state_dir).map_err(|e| format!("opening {}: {e}", lock_path(state_dir).display()))?;
        flock(&lock, FlockOperation::LockExclusive).map_err(|e| format!("waiting for the trim in progress: {e}"))?;
        Some(lock)
    };
    let result = trim_now(state_dir, policy);
    if detached && let Err(e) = &result {
        record_failure(state_dir, e);
    }
    result
}

/// Leaves why a detached trim failed, for the next session to say.
pub fn record_failure(state_dir: &Path, why: &str) {
    let _ = fs::write(error_path(state_dir), why);
}

fn trim_now(state_dir: &Path, policy: &TrimPolicy) -> Result<TrimReport, String> {
    // Opening the store creates it: not for a directory removed meanwhile.
    if !state_dir.join("objects").is_dir() {
        return Ok(TrimReport::default());
    }
    let store = Store::open(state_dir).map_err(|e| format!("trimming the local store: {e}"))?;
    let report = store
        .trim_now(policy, sessions::oldest_running(state_dir))
        .map_err(|e| format!("trimming the local store: {e}"))?;
    if state_dir.join("entries").is_dir() {
        let entries = LocalEntries::open(state_dir).map_err(|e| format!("trimming local entries: {e}"))?;
        entries.trim(|e| store.contains(&e.output_id, e.size)).map_err(|e| format!("trimming local entries: {e}"))?;
    }
    Ok(report)
}
