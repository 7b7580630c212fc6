//! The local tier's index: which output each action produced, kept on this
//! machine in front of a plugin that stores elsewhere (a server, a shared
//! directory, memory), so that what this machine built or fetched once is a
//! hit from local disk afterwards, without a call into the plugin, and stays
//! one while the remote is down.
//!
//! Entries live in 256 append-only logs, `entries/<2 hex>.log`, by the action
//! id's first byte; a line is `v1 <action hex> <output hex> <size> <put time
//! ns>`, and a later line for the same action replaces an earlier one. A log
//! per shard rather than a file per entry, because a warm build from a remote
//! records an entry per output it fetches, and on ext4 creating a file costs
//! tens of microseconds of the machine's CPU where appending a line costs a
//! few. Each line goes out in one `write` on a file opened for appending, so
//! concurrent go commands interleave whole lines; a torn or foreign line is
//! skipped when read. A shard is read once per process, at its first lookup,
//! and kept in memory after that.
//!
//! Trimming rewrites each log keeping the entries whose body the store still
//! has: an entry is only worth its body. A line another process appends while
//! its log is being rewritten may be lost; that costs a later lookup in the
//! plugin, never a wrong answer.
//!
//! It owns only `entries/`. It never decides whether a body is present: an
//! entry whose body is gone from the object store is simply not a local hit.

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io::{self, ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use crate::domain::{Digest, Entry};

/// A temporary rewrite older than this was abandoned.
const STALE_REWRITE: Duration = Duration::from_secs(3600);

pub struct LocalEntries {
    root: PathBuf,
    /// Each shard's entries, once read.
    shards: Vec<Mutex<Option<HashMap<Digest, Entry>>>>,
}

impl LocalEntries {
    pub fn open(state_dir: &Path) -> io::Result<LocalEntries> {
        let root = state_dir.join("entries");
        fs::create_dir_all(&root).map_err(|e| io::Error::new(e.kind(), format!("creating {}: {e}", root.display())))?;
        Ok(LocalEntries { root, shards: (0..256).map(|_| Mutex::new(None)).collect() })
    }

    fn log_path(&self, shard: u8) -> PathBuf {
        self.root.join(format!("{shard:02x}.log"))
    }

    /// The entry recorded for `action_id`, if there is one.
    pub fn read(&self, action_id: &Digest) -> Option<Entry> {
        let mut shard = self.shards[action_id[0] as usize].lock().unwrap();
        shard.get_or_insert_with(|| load(&self.log_path(action_id[0]))).get(action_id).copied()
    }

    /// Records (or replaces) the entry for `action_id`.
    pub fn write(&self, action_id: &Digest, entry: &Entry) -> io::Result<()> {
        let line = line(action_id, entry);
        let mut shard = self.shards[action_id[0] as usize].lock().unwrap();
        let path = self.log_path(action_id[0]);
        OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .and_then(|mut log| log.write_all(line.as_bytes()))
            .map_err(|e| io::Error::new(e.kind(), format!("appending to {}: {e}", path.display())))?;
        if let Some(entries) = shard.as_mut() {
            entries.insert(*action_id, *entry);
        }
        Ok(())
    }

    /// Keeps only the entries for which `keep` holds (their body is still
    /// stored), and removes what older versions of gocp left here (a file per
    /// entry). Returns how many entries or files went.
    pub fn trim(&self, keep: impl Fn(&Entry) -> bool) -> io::Result<u64> {
        let mut removed = 0;
        for shard in 0..=255u8 {
            let path = self.log_path(shard);
            let mut guard = self.shards[shard as usize].lock().unwrap();
            let text = match fs::read(&path) {
                Ok(text) => text,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let lines = text.iter().filter(|&&b| b == b'\n').count() as u64;
            let kept: HashMap<Digest, Entry> = parse_log(&text).into_iter().filter(|(_, e)| keep(e)).collect();
            if kept.len() as u64 == lines {
                continue;
            }
            let mut out = tempfile::Builder::new().prefix(".log-").tempfile_in(&self.root)?;
            let mut rewritten = String::with_capacity(kept.len() * 170);
            for (action, entry) in &kept {
                rewritten.push_str(&line(action, entry));
            }
            out.write_all(rewritten.as_bytes())?;
            out.persist(&path).map_err(|e| e.error)?;
            removed += lines - kept.len() as u64;
            *guard = Some(kept);
        }
        let now = SystemTime::now();
        for other in fs::read_dir(&self.root)?.flatten() {
            if other.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                for file in fs::read_dir(other.path())?.flatten() {
                    if fs::remove_file(file.path()).is_ok() {
                        removed += 1;
                    }
                }
                let _ = fs::remove_dir(other.path());
            } else if other.file_name().to_string_lossy().starts_with(".log-")
                && other
                    .metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| now.duration_since(t).unwrap_or_default() > STALE_REWRITE)
            {
                // A rewrite a killed process left behind.
                let _ = fs::remove_file(other.path());
            }
        }
        Ok(removed)
    }
}

fn line(action_id: &Digest, entry: &Entry) -> String {
    format!("v1 {} {} {} {}\n", hex::encode(action_id), hex::encode(entry.output_id), entry.size, entry.put_time_ns)
}

/// A shard's entries; an unreadable log is an empty one (every lookup a miss).
fn load(path: &Path) -> HashMap<Digest, Entry> {
    fs::read(path).map(|text| parse_log(&text)).unwrap_or_default()
}

/// The complete, well-formed lines of a log, the last one winning per action.
fn parse_log(text: &[u8]) -> HashMap<Digest, Entry> {
    let mut entries = HashMap::new();
    // What follows the last newline is a line still being written, or torn.
    let complete = text.iter().rposition(|&b| b == b'\n').map(|end| &text[..end]).unwrap_or_default();
    for line in complete.split(|&b| b == b'\n') {
        if let Some((action, entry)) = std::str::from_utf8(line).ok().and_then(parse_line) {
            entries.insert(action, entry);
        }
    }
    entries
}

fn parse_line(line: &str) -> Option<(Digest, Entry)> {
    let mut fields = line.split(' ');
    if fields.next()? != "v1" {
        return None;
    }
    let mut action = [0u8; 32];
    hex::decode_to_slice(fields.next()?, &mut action).ok()?;
    let mut output_id = [0u8; 32];
    hex::decode_to_slice(fields.next()?, &mut output_id).ok()?;
    let size = fields.next()?.parse().ok()?;
    let put_time_ns = fields.next()?.parse().ok()?;
    fields.next().is_none().then_some((action, Entry { output_id, size, put_time_ns }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_written_replaced_read_and_seen_by_another_process() {
        let dir = tempfile::tempdir().unwrap();
        let entries = LocalEntries::open(dir.path()).unwrap();
        let action = [7u8; 32];
        assert_eq!(entries.read(&action), None);
        let first = Entry { output_id: [1; 32], size: 10, put_time_ns: 5 };
        entries.write(&action, &first).unwrap();
        assert_eq!(entries.read(&action), Some(first));
        let second = Entry { output_id: [2; 32], size: 0, put_time_ns: 6 };
        entries.write(&action, &second).unwrap();
        assert_eq!(entries.read(&action), Some(second));

        let later = LocalEntries::open(dir.path()).unwrap();
        assert_eq!(later.read(&action), Some(second), "the last line wins");
        assert_eq!(later.read(&[8; 32]), None);
    }

    #[test]
    fn trimming_keeps_the_entries_whose_body_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let entries = LocalEntries::open(dir.path()).unwrap();
        let kept = Entry { output_id: [1; 32], size: 1, put_time_ns: 1 };
        let gone = Entry { output_id: [2; 32], size: 2, put_time_ns: 2 };
        entries.write(&[7; 32], &kept).unwrap();
        entries.write(&[7; 32], &kept).unwrap();
        entries.write(&[0x70; 32], &gone).unwrap();
        let legacy = dir.path().join("entries/07");
        fs::create_dir_all(&legacy).unwrap();
        fs::write(legacy.join("x"), "v1 ...").unwrap();

        assert_eq!(entries.trim(|e| e.output_id == [1; 32]).unwrap(), 3, "a duplicate line, an entry, a legacy file");
        assert!(!legacy.exists());
        assert_eq!(entries.read(&[7; 32]), Some(kept));
        assert_eq!(entries.read(&[0x70; 32]), None);
        let later = LocalEntries::open(dir.path()).unwrap();
        assert_eq!(later.read(&[7; 32]), Some(kept));
        assert_eq!(later.read(&[0x70; 32]), None);
        assert_eq!(entries.trim(|_| true).unwrap(), 0, "nothing left to remove");
    }

    #[test]
    fn torn_and_foreign_lines_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let entries = LocalEntries::open(dir.path()).unwrap();
        let good = Entry { output_id: [3; 32], size: 4, put_time_ns: 5 };
        entries.write(&[9; 32], &good).unwrap();
        let mut log = OpenOptions::new().append(true).open(entries.log_path(9)).unwrap();
        let action = hex::encode([9u8; 32]);
        for junk in [
            "\n".to_string(),
            "v2 x\n".to_string(),
            format!("v1 {action} {} x 2\n", "ab".repeat(32)),
            format!("v1 {action} {} 1 2 3\n", "ab".repeat(32)),
            format!("v1 {} {} 1 2\n", "zz".repeat(32), "ab".repeat(32)),
            // Torn: no newline yet, so not a line.
            format!("v1 {action} {} 1 2", "ab".repeat(32)),
        ] {
            log.write_all(junk.as_bytes()).unwrap();
        }
        let later = LocalEntries::open(dir.path()).unwrap();
        assert_eq!(later.read(&[9; 32]), Some(good));
    }
}
