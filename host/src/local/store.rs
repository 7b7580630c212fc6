//! The local object store: the files the go command reads through DiskPath.
//!
//! Bodies are kept content-addressed, `objects/<2 hex>/<64 hex output id>`, and
//! only ever appear there by renaming a complete temporary file that was hashed
//! while it was written and matched its output id. So a file under a final name
//! is always whole and correct, is never modified afterwards, and is shared by
//! every action (and every concurrent go command) that produced the same bytes.
//! Plugins are never granted this directory; that is what lets a hit be served
//! without hashing the file again.
//!
//! It owns those files and their trimming; it knows nothing of the protocol or
//! of plugins, and must never write anywhere but under its root.

use std::fs::{self, Permissions};
use std::io::{self, BufWriter, ErrorKind, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use sha2::{Digest as _, Sha256};

use crate::domain::Digest;

/// A use refreshes a file's modification time only when it is older than
/// this, as Go's own cache does: one metadata write per hour at most.
const TOUCH_INTERVAL: Duration = Duration::from_secs(3600);
/// Temporary files older than this were left by a killed process.
const STALE_TMP: Duration = Duration::from_secs(3600);
/// Outputs used this recently are never trimmed, even over the size limit:
/// tools such as gopls and golangci-lint open the files `go list -export`
/// printed after that go command has exited.
const RECENT_USE: Duration = Duration::from_secs(3600);

/// Why a body was not accepted into the store.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error("body hashes to {actual}, not to its output id {expected}")]
    HashMismatch { expected: String, actual: String },
    #[error("body has {actual} bytes, expected {expected}")]
    SizeMismatch { expected: u64, actual: u64 },
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Limits applied by [`Store::trim`].
#[derive(Debug, Clone, Copy)]
pub struct TrimPolicy {
    /// Remove bodies unused for longer than this.
    pub max_age: Duration,
    /// Then remove the least recently used bodies until at most this many bytes remain.
    pub max_size: u64,
    /// Trim at most this often (a marker file records the last time).
    pub interval: Duration,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct TrimReport {
    pub ran: bool,
    pub removed_files: u64,
    pub removed_bytes: u64,
    pub kept_bytes: u64,
    /// Of `kept_bytes`, what would have gone for the size limit but was in
    /// use by a running go command or used recently.
    pub kept_in_use_bytes: u64,
}

pub struct Store {
    objects: PathBuf,
    /// `objects` as a string: paths are built for every lookup, and appending
    /// to a string is several times cheaper than joining path components.
    objects_str: String,
    tmp: PathBuf,
}

impl Store {
    /// Opens (creating if needed) the store under `root`, and checks that it
    /// can be written to: a store that cannot take a put is no store at all.
    pub fn open(root: &Path) -> io::Result<Store> {
        let objects = root.join("objects");
        let tmp = objects.join("tmp");
        fs::create_dir_all(&tmp).map_err(|e| annotate(e, "creating", &tmp))?;
        let objects_str = objects
            .to_str()
            .ok_or_else(|| io::Error::new(ErrorKind::InvalidInput, "the state directory must be valid UTF-8"))?
            .to_string();
        let store = Store { objects, objects_str, tmp };
        drop(store.begin()?);
        Ok(store)
    }

    pub fn path_of(&self, output_id: &Digest) -> PathBuf {
        let mut name = [0u8; 64];
        hex::encode_to_slice(output_id, &mut name).expect("32 bytes make 64 hex digits");
        let name = std::str::from_utf8(&name).expect("hex digits are ASCII");
        let mut path = String::with_capacity(self.objects_str.len() + 68);
        path.push_str(&self.objects_str);
        path.push('/');
        path.push_str(&name[..2]);
        path.push('/');
        path.push_str(name);
        PathBuf::from(path)
    }

    /// The path of a stored body of exactly `size` bytes, if there is one.
    /// Records the use for trimming.
    pub fn lookup(&self, output_id: &Digest, size: u64) -> Option<PathBuf> {
        let path = self.path_of(output_id);
        let meta = fs::metadata(&path).ok()?;
        if !meta.is_file() || meta.len() != size {
            return None;
        }
        touch_if_stale(&path, &meta);
        Some(path)
    }

    /// Whether a body of exactly `size` bytes is stored (not a use: nothing
    /// is recorded for trimming).
    pub fn contains(&self, output_id: &Digest, size: u64) -> bool {
        fs::metadata(self.path_of(output_id)).is_ok_and(|m| m.is_file() && m.len() == size)
    }

    /// Starts receiving a body: bytes written to the returned writer go to a
    /// temporary file and into a running hash.
    pub fn begin(&self) -> io::Result<BodyWriter> {
        let file = tempfile::Builder::new()
            .prefix("body-")
            .permissions(Permissions::from_mode(0o644))
            .tempfile_in(&self.tmp)
            .map_err(|e| annotate(e, "creating a temporary file in", &self.tmp))?;
        Ok(BodyWriter { out: BufWriter::with_capacity(256 * 1024, file), hash: Sha256::new(), len: 0 })
    }

    /// Moves a received body into place if it hashes to `output_id` and has
    /// `size` bytes; otherwise the temporary file is removed.
    pub fn commit(&self, body: BodyWriter, output_id: &Digest, size: u64) -> Result<PathBuf, CommitError> {
        let BodyWriter { out, hash, len } = body;
        let file = out.into_inner().map_err(|e| e.into_error())?;
        if len != size {
            return Err(CommitError::SizeMismatch { expected: size, actual: len });
        }
        let actual: Digest = hash.finalize().into();
        if &actual != output_id {
            return Err(CommitError::HashMismatch { expected: hex::encode(output_id), actual: hex::encode(actual) });
        }
        let path = self.path_of(output_id);
        let failed = match file.persist_noclobber(&path) {
            Ok(_) => return Ok(path),
            Err(e) if e.error.kind() == ErrorKind::NotFound => {
                let dir = path.parent().expect("object paths have a parent");
                fs::create_dir_all(dir).map_err(|e| annotate(e, "creating", dir))?;
                match e.file.persist_noclobber(&path) {
                    Ok(_) => return Ok(path),
                    Err(e) => e,
                }
            }
            Err(e) => e,
        };
        if failed.error.kind() != ErrorKind::AlreadyExists {
            return Err(annotate(failed.error, "storing", &path).into());
        }
        // Someone else stored the same bytes first: theirs are as good, unless
        // the file was damaged since (a failing disk, a hand edit), which only
        // its size tells cheaply. Replacing it is atomic, and a reader of the
        // old file keeps what it opened.
        if fs::metadata(&path).is_ok_and(|m| m.is_file() && m.len() == size) {
            return Ok(path);
        }
        failed.file.persist(&path).map_err(|e| annotate(e.error, "storing", &path))?;
        Ok(path)
    }

    /// Stores `bytes` as the body of `output_id`, verified like any other.
    pub fn keep(&self, bytes: &[u8], output_id: &Digest) -> Result<PathBuf, CommitError> {
        let mut writer = self.begin()?;
        writer.write_all(bytes)?;
        self.commit(writer, output_id, bytes.len() as u64)
    }

    /// Whether a trim is due (the last one began `policy.interval` ago or
    /// more); if so, claims it by dating the marker now, so that concurrent go
    /// commands skip it.
    pub fn claim_trim(&self, policy: &TrimPolicy) -> io::Result<bool> {
        let now = SystemTime::now();
        let marker = self.objects.join("last-trim");
        // A last trim in the future (the clock was ahead) says nothing: trim,
        // as Go's own cache does, rather than never again until that time.
        if let Ok(meta) = fs::metadata(&marker)
            && let Ok(since) = now.duration_since(meta.modified()?)
            && since < policy.interval
        {
            return Ok(false);
        }
        fs::write(&marker, b"").map_err(|e| annotate(e, "writing", &marker))?;
        filetime::set_file_mtime(&marker, filetime::FileTime::from_system_time(now))?;
        Ok(true)
    }

    /// Removes temporary files a killed process left, bodies unused for
    /// `policy.max_age`, then the least recently used until at most
    /// `policy.max_size` bytes remain; whatever the size, never one used
    /// since `oldest_session` began (the oldest go command still served from
    /// this directory, see `sessions`) nor within the last hour: a go command
    /// must never lose a file it was handed.
    pub fn trim_now(&self, policy: &TrimPolicy, oldest_session: Option<SystemTime>) -> io::Result<TrimReport> {
        let now = SystemTime::now();
        let mut report = TrimReport { ran: true, ..Default::default() };
        for entry in fs::read_dir(&self.tmp)?.flatten() {
            if let Ok(meta) = entry.metadata()
                && now.duration_since(meta.modified()?).unwrap_or_default() > STALE_TMP
            {
                remove(&entry.path(), meta.len(), &mut report);
            }
        }

        // A use refreshes a file's time only when it is older than
        // TOUCH_INTERVAL, so a file used at time t has a time after t minus that.
        let used_since = oldest_session.map_or(now, |s| s.min(now)).min(now - RECENT_USE);
        let in_use_after = used_since.checked_sub(TOUCH_INTERVAL).unwrap_or(SystemTime::UNIX_EPOCH);
        let mut files = Vec::new();
        for shard in fs::read_dir(&self.objects)?.flatten() {
            let name = shard.file_name();
            if name.len() != 2 || !shard.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                continue;
            }
            for file in fs::read_dir(shard.path())?.flatten() {
                if let Ok(meta) = file.metadata() {
                    files.push((meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), meta.len(), file.path()));
                }
            }
        }
        files.sort();
        let mut total: u64 = files.iter().map(|f| f.1).sum();
        for (modified, len, path) in &files {
            let too_old = now.duration_since(*modified).unwrap_or_default() > policy.max_age;
            if !too_old && total <= policy.max_size {
                continue;
            }
            if *modified >= in_use_after {
                // Oldest first: every file from here on is as recent.
                report.kept_in_use_bytes = total.saturating_sub(policy.max_size);
                break;
            }
            // A go command may have been handed it since it was listed.
            if fs::metadata(path).and_then(|m| m.modified()).is_ok_and(|m| m != *modified) {
                continue;
            }
            remove(path, *len, &mut report);
            total -= len;
        }
        report.kept_bytes = total;
        Ok(report)
    }
}

fn remove(path: &Path, len: u64, report: &mut TrimReport) {
    if fs::remove_file(path).is_ok() {
        report.removed_files += 1;
        report.removed_bytes += len;
    }
}

fn touch_if_stale(path: &Path, meta: &fs::Metadata) {
    let now = SystemTime::now();
    let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
    if now.duration_since(modified).unwrap_or_default() > TOUCH_INTERVAL {
        // Only trimming precision depends on this; a failure is not worth a word.
        let _ = filetime::set_file_mtime(path, filetime::FileTime::from_system_time(now));
    }
}

fn annotate(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

/// A body being received; see [`Store::begin`] and [`Store::commit`].
pub struct BodyWriter {
    out: BufWriter<tempfile::NamedTempFile>,
    hash: Sha256,
    len: u64,
}

impl Write for BodyWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.out.write(buf)?;
        self.hash.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a session does at its end, in this process.
    fn trim(store: &Store, policy: &TrimPolicy, oldest_session: Option<SystemTime>) -> TrimReport {
        if !store.claim_trim(policy).unwrap() {
            return TrimReport::default();
        }
        store.trim_now(policy, oldest_session).unwrap()
    }

    fn sha(bytes: &[u8]) -> Digest {
        Sha256::digest(bytes).into()
    }

    #[test]
    fn commit_accepts_only_matching_bodies() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let body = b"hello, cache";
        let id = sha(body);

        let mut w = store.begin().unwrap();
        w.write_all(body).unwrap();
        let path = store.commit(w, &id, body.len() as u64).unwrap();
        assert_eq!(fs::read(&path).unwrap(), body);
        assert!(path.extension().is_none());
        assert_eq!(store.lookup(&id, body.len() as u64), Some(path.clone()));
        assert_eq!(store.lookup(&id, 3), None, "a size mismatch is a miss");

        let mut w = store.begin().unwrap();
        w.write_all(b"other bytes").unwrap();
        assert!(matches!(store.commit(w, &sha(b"nope"), 11), Err(CommitError::HashMismatch { .. })));
        let mut w = store.begin().unwrap();
        w.write_all(body).unwrap();
        assert!(matches!(store.commit(w, &id, 99), Err(CommitError::SizeMismatch { .. })));
        assert_eq!(fs::read_dir(dir.path().join("objects/tmp")).unwrap().count(), 0, "rejected bodies leave nothing");

        // Storing the same bytes again keeps the first file (same inode).
        let ino = fs::metadata(&path).unwrap().ino();
        let mut w = store.begin().unwrap();
        w.write_all(body).unwrap();
        assert_eq!(store.commit(w, &id, body.len() as u64).unwrap(), path);
        assert_eq!(fs::metadata(&path).unwrap().ino(), ino);
    }

    #[test]
    fn empty_body_is_a_file_too() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let path = store.commit(store.begin().unwrap(), &sha(b""), 0).unwrap();
        assert_eq!(fs::metadata(path).unwrap().len(), 0);
    }

    #[test]
    fn trim_removes_old_then_least_recently_used() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let now = SystemTime::now();
        let mut paths = Vec::new();
        for (i, age_hours) in [(0u8, 200u64), (1, 3), (2, 2), (3, 1)] {
            let body = vec![i; 1000];
            let mut w = store.begin().unwrap();
            w.write_all(&body).unwrap();
            let p = store.commit(w, &sha(&body), 1000).unwrap();
            let t = now - Duration::from_secs(age_hours * 3600);
            filetime::set_file_mtime(&p, filetime::FileTime::from_system_time(t)).unwrap();
            paths.push(p);
        }
        let policy = TrimPolicy {
            max_age: Duration::from_secs(100 * 3600),
            max_size: 2000,
            interval: Duration::from_secs(3600),
        };
        let report = trim(&store, &policy, None);
        assert_eq!(
            report,
            TrimReport { ran: true, removed_files: 2, removed_bytes: 2000, kept_bytes: 2000, kept_in_use_bytes: 0 }
        );
        let exists: Vec<bool> = paths.iter().map(|p| p.exists()).collect();
        assert_eq!(exists, [false, false, true, true]);
        // Within the interval nothing runs.
        assert!(!trim(&store, &policy, None).ran);
    }

    /// Stores four 1000-byte bodies last used `ages` ago.
    fn bodies_aged(store: &Store, ages: [Duration; 4]) -> Vec<PathBuf> {
        let now = SystemTime::now();
        (0u8..4)
            .zip(ages)
            .map(|(i, age)| {
                let body = vec![i; 1000];
                let mut w = store.begin().unwrap();
                w.write_all(&body).unwrap();
                let p = store.commit(w, &sha(&body), 1000).unwrap();
                filetime::set_file_mtime(&p, filetime::FileTime::from_system_time(now - age)).unwrap();
                p
            })
            .collect()
    }

    #[test]
    fn trim_never_removes_what_a_running_session_may_use() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let hour = Duration::from_secs(3600);
        let paths = bodies_aged(&store, [hour * 30, hour * 20, hour * 10, Duration::ZERO]);
        let policy = TrimPolicy { max_age: hour * 1000, max_size: 0, interval: Duration::ZERO };
        // A session that started 15 hours ago may hold anything used since
        // 16 hours ago (uses refresh times hourly).
        let report = trim(&store, &policy, Some(SystemTime::now() - hour * 15));
        let exists: Vec<bool> = paths.iter().map(|p| p.exists()).collect();
        assert_eq!(exists, [false, false, true, true]);
        assert_eq!(report.kept_in_use_bytes, 2000);
        // With no session running, what was used within the hour stays all the same.
        trim(&store, &policy, None);
        let exists: Vec<bool> = paths.iter().map(|p| p.exists()).collect();
        assert_eq!(exists, [false, false, false, true]);
    }

    #[test]
    fn a_last_trim_in_the_future_does_not_stop_trimming() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let day = Duration::from_secs(86_400);
        let paths = bodies_aged(&store, [day * 10; 4]);
        let marker = dir.path().join("objects/last-trim");
        fs::write(&marker, b"").unwrap();
        filetime::set_file_mtime(&marker, filetime::FileTime::from_system_time(SystemTime::now() + day)).unwrap();
        let policy = TrimPolicy { max_age: day * 5, max_size: u64::MAX, interval: day };
        assert!(trim(&store, &policy, None).ran);
        assert!(paths.iter().all(|p| !p.exists()), "outputs unused for 10 days are trimmed");
    }

    #[test]
    fn a_damaged_object_is_replaced_by_a_verified_put() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let body = b"export data";
        let id = sha(body);
        let path = store.path_of(&id);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, b"").unwrap();
        assert_eq!(store.lookup(&id, body.len() as u64), None, "a truncated object is a miss");
        let mut w = store.begin().unwrap();
        w.write_all(body).unwrap();
        assert_eq!(store.commit(w, &id, body.len() as u64).unwrap(), path);
        assert_eq!(fs::read(&path).unwrap(), body, "the put repaired it");
    }

    use std::os::unix::fs::MetadataExt;
}
