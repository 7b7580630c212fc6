//! Which go commands are being served from a state directory right now, so
//! that trimming never removes a file one of them was handed.
//!
//! A go command reads the files it was given as DiskPaths until it exits, and
//! a long build or test run links against outputs it received an hour
//! earlier. Refreshing every served file's time on each hit would cost a
//! metadata write per hit; instead each gocp-host holds an exclusive lock on a
//! slot file under `sessions/` for as long as it runs, with its start time
//! written inside. A trim asks for the start of the oldest session still
//! holding its lock and spares every object used since then (see
//! `store::Store::trim`). Locks are `flock`s: the kernel drops them when a
//! process ends in any way, SIGKILL included, so a crashed session never
//! protects anything for long.
//!
//! Slots are reused rather than created per session, because creating a file
//! costs tens of microseconds on ext4 and every go command pays start-up.
//!
//! It owns only `sessions/`; it never removes anything.

use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustix::fs::{FlockOperation, flock};

/// More slots than concurrent go commands on one machine; beyond it a session
/// runs without a lease, protected only by the trim's recent-use window.
const MAX_SLOTS: usize = 1024;

/// Held for the life of a session: while it is, its start time is visible to
/// every trim.
pub struct Lease {
    _slot: File,
}

fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("sessions")
}

/// Takes the first free slot and writes this session's start time in it.
pub fn acquire(state_dir: &Path, started: SystemTime) -> io::Result<Lease> {
    let dir = dir(state_dir);
    for slot in 0..MAX_SLOTS {
        let path = dir.join(slot.to_string());
        let file = match OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                fs::create_dir_all(&dir)?;
                OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path)?
            }
            Err(e) => return Err(e),
        };
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {
                // Fixed width, so a longer older value never leaves digits behind.
                let text = format!("{:020}\n", nanos(started));
                file.write_all_at(text.as_bytes(), 0)?;
                return Ok(Lease { _slot: file });
            }
            Err(rustix::io::Errno::WOULDBLOCK) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(io::Error::other(format!("all {MAX_SLOTS} session slots in {} are taken", dir.display())))
}

/// The start of the oldest session other than the caller's still running,
/// if any.
pub fn oldest_running(state_dir: &Path) -> Option<SystemTime> {
    let mut oldest: Option<SystemTime> = None;
    for entry in fs::read_dir(dir(state_dir)).ok()?.flatten() {
        let Ok(mut file) = File::open(entry.path()) else { continue };
        // A slot we can lock is free; ours is locked through another open
        // file description, so it counts as running too, which is harmless.
        if flock(&file, FlockOperation::NonBlockingLockShared).is_ok() {
            continue;
        }
        let mut text = String::new();
        if file.read_to_string(&mut text).is_err() {
            continue;
        }
        // A slot being taken right now may not hold its time yet: then the
        // session started just now.
        let started =
            text.trim().parse::<u64>().ok().map_or_else(SystemTime::now, |ns| UNIX_EPOCH + Duration::from_nanos(ns));
        oldest = Some(oldest.map_or(started, |o| o.min(started)));
    }
    oldest
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_sessions_are_seen_and_ended_ones_are_not() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(oldest_running(dir.path()), None);
        let t1 = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let t2 = UNIX_EPOCH + Duration::from_secs(2_000_000);
        let second = acquire(dir.path(), t2).unwrap();
        let first = acquire(dir.path(), t1).unwrap();
        assert_eq!(oldest_running(dir.path()), Some(t1));
        drop(first);
        assert_eq!(oldest_running(dir.path()), Some(t2));
        // The freed slot is reused, and an older value is overwritten whole.
        let third = acquire(dir.path(), t2 + Duration::from_secs(5)).unwrap();
        assert_eq!(fs::read_dir(dir.path().join("sessions")).unwrap().count(), 2);
        drop(second);
        assert_eq!(oldest_running(dir.path()), Some(t2 + Duration::from_secs(5)));
        drop(third);
        assert_eq!(oldest_running(dir.path()), None);
    }
}
