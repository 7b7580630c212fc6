//! The local tier's index: which output each action produced, kept on this
//! machine in front of a plugin that stores elsewhere (a server, a shared
//! directory, memory), so that what this machine built or fetched once is a
//! hit from local disk afterwards, without a call into the plugin, and stays
//! one while the remote is down.
//!
//! `entries/<2 hex>/<64 hex action id>` holds one line in the format the
//! shipped plugins use (`v1 <output hex> <size> <put time ns>`). A file
//! appears or is replaced only by renaming a complete temporary file, so a
//! reader sees a whole line. File times record use (refreshed at most hourly)
//! for trimming by age.
//!
//! It owns only these files. It never decides whether a body is present:
//! an entry whose body is gone from the object store is simply not a local hit.

use std::fs;
use std::io::{self, ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::plugin::Entry;
use crate::store::Digest;

/// As for objects: one metadata write per hour at most.
const TOUCH_INTERVAL: Duration = Duration::from_secs(3600);

pub struct LocalEntries {
    root: PathBuf,
    tmp: PathBuf,
}

impl LocalEntries {
    pub fn open(state_dir: &Path) -> io::Result<LocalEntries> {
        let root = state_dir.join("entries");
        let tmp = root.join("tmp");
        fs::create_dir_all(&tmp).map_err(|e| io::Error::new(e.kind(), format!("creating {}: {e}", tmp.display())))?;
        Ok(LocalEntries { root, tmp })
    }

    fn path_of(&self, action_id: &Digest) -> PathBuf {
        let name = hex::encode(action_id);
        self.root.join(&name[..2]).join(name)
    }

    /// The entry recorded for `action_id`, if there is a readable one.
    pub fn read(&self, action_id: &Digest) -> Option<Entry> {
        let path = self.path_of(action_id);
        let text = fs::read_to_string(&path).ok()?;
        let entry = parse(&text)?;
        if let Ok(meta) = fs::metadata(&path)
            && SystemTime::now().duration_since(meta.modified().unwrap_or(SystemTime::UNIX_EPOCH)).unwrap_or_default()
                > TOUCH_INTERVAL
        {
            // Only trimming precision depends on this; a failure is not worth a word.
            let _ = filetime::set_file_mtime(&path, filetime::FileTime::now());
        }
        Some(entry)
    }

    /// Records (or replaces) the entry for `action_id`.
    pub fn write(&self, action_id: &Digest, entry: &Entry) -> io::Result<()> {
        let line = format!("v1 {} {} {}\n", hex::encode(entry.output_id), entry.size, entry.put_time_ns);
        let mut file = tempfile::Builder::new().prefix("entry-").tempfile_in(&self.tmp)?;
        file.write_all(line.as_bytes())?;
        let path = self.path_of(action_id);
        match file.persist(&path) {
            Ok(_) => Ok(()),
            Err(e) if e.error.kind() == ErrorKind::NotFound => {
                fs::create_dir_all(path.parent().expect("entry paths have a parent"))?;
                e.file.persist(&path).map(drop).map_err(|e| e.error)
            }
            Err(e) => Err(e.error),
        }
    }

    /// Removes entries unused for longer than `max_age` (and temporary files
    /// left by a killed process). Returns how many files went.
    pub fn trim(&self, max_age: Duration) -> io::Result<u64> {
        let now = SystemTime::now();
        let mut removed = 0;
        for dir in fs::read_dir(&self.root)?.flatten() {
            if !dir.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                continue;
            }
            let stale_after = if dir.path() == self.tmp { Duration::from_secs(3600) } else { max_age };
            for file in fs::read_dir(dir.path())?.flatten() {
                let modified = file.metadata().and_then(|m| m.modified()).unwrap_or(SystemTime::UNIX_EPOCH);
                if now.duration_since(modified).unwrap_or_default() > stale_after
                    && fs::remove_file(file.path()).is_ok()
                {
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }
}

fn parse(text: &str) -> Option<Entry> {
    let mut fields = text.trim_end().split(' ');
    if fields.next()? != "v1" {
        return None;
    }
    let mut output_id = [0u8; 32];
    hex::decode_to_slice(fields.next()?, &mut output_id).ok()?;
    let size = fields.next()?.parse().ok()?;
    let put_time_ns = fields.next()?.parse().ok()?;
    fields.next().is_none().then_some(Entry { output_id, size, put_time_ns })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_written_replaced_read_and_trimmed() {
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

        assert_eq!(entries.trim(Duration::from_secs(3600)).unwrap(), 0);
        let path = entries.path_of(&action);
        let old = SystemTime::now() - Duration::from_secs(7200);
        filetime::set_file_mtime(&path, filetime::FileTime::from_system_time(old)).unwrap();
        assert_eq!(entries.trim(Duration::from_secs(3600)).unwrap(), 1);
        assert_eq!(entries.read(&action), None);
    }

    #[test]
    fn unreadable_lines_are_not_entries() {
        let dir = tempfile::tempdir().unwrap();
        let entries = LocalEntries::open(dir.path()).unwrap();
        let action = [9u8; 32];
        let path = entries.path_of(&action);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        for junk in
            ["", "v1", "v2 00 1 2", &format!("v1 {} x 2", "ab".repeat(32)), &format!("v1 {} 1 2 3", "ab".repeat(32))]
        {
            fs::write(&path, junk).unwrap();
            assert_eq!(entries.read(&action), None, "{junk:?}");
        }
    }
}
