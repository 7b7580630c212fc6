//! `disk`: a persistent cache backend in a directory, the default plugin.
//!
//! Layout under its root (`/state` unless `path` says otherwise):
//! - `entries/<2 hex>/<64 hex action id>`: one line, `v1 <output hex> <size> <put time ns>`.
//! - `bodies/<2 hex>/<64 hex output id>`: the body, only when bodies are stored.
//! - `last-trim`, `trim-pass`, `trim.lock`: trimming's own state (see `trim`).
//!
//! Every file appears by rename of a complete temporary file in the same
//! directory, so several go commands (and several instances) can share one
//! directory without locks: readers see a whole old file or a whole new one.
//! File times record use (refreshed at most hourly, as Go's own cache does), and
//! trimming removes what went unused for `max-age` and, with bodies, the least
//! recently used bodies beyond `max-size`, a bounded step at each `finish`.
//!
//! In the default setup the host already keeps every body on this same disk, so
//! the plugin keeps entries only: storing bodies again would double the disk
//! use for nothing. Pointed at another directory (a shared or network mount),
//! it stores bodies too.
//!
//! It must never assume it is alone on the directory, nor leave a partial file
//! under a final name.

use std::collections::hash_map::RandomState;
use std::fs::{self, File};
use std::hash::BuildHasher;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

mod trim;

use wasip2::filesystem::preopens::get_directories;
use wasip2::filesystem::types::{Descriptor, DescriptorFlags, ErrorCode, NewTimestamp, OpenFlags, PathFlags};

use gocp_plugin_sdk::{
    Backend, Capabilities, Config, ConfigKey, Digest, Entry, Error, Info, InputStream, MAX_ENTRY_LINE, OutputStream,
    copy_from_stream, copy_to_stream, export_backend, hex,
};

const STATE_DIR: &str = "/state";
const DEFAULT_MAX_AGE: Duration = Duration::from_secs(5 * 86_400);
const DEFAULT_MAX_SIZE: u64 = 10 << 30;
const DEFAULT_TRIM_INTERVAL: Duration = Duration::from_secs(86_400);
/// How stale a file's time may get before a use refreshes it: writing a time on
/// every hit would cost a metadata write per cache hit.
const TOUCH_INTERVAL: Duration = Duration::from_secs(3600);

struct Disk {
    root: PathBuf,
    /// The preopened directory that holds `root`, and `root` relative to it:
    /// lookups open entries through it with one host call.
    preopen: Descriptor,
    relative_root: String,
    bodies: bool,
    max_age: Duration,
    max_size: u64,
    trim_interval: Duration,
    random: RandomState,
    tmp_counter: u64,
}

impl Disk {
    /// An entry's path relative to the preopened directory.
    fn entry_relative(&self, action_id: &Digest) -> String {
        let h = hex(action_id);
        format!("{}entries/{}/{h}", self.relative_root, &h[..2])
    }

    fn entry_path(&self, action_id: &Digest) -> PathBuf {
        let h = hex(action_id);
        self.root.join("entries").join(&h[..2]).join(h)
    }

    fn body_path(&self, output_id: &Digest) -> PathBuf {
        let h = hex(output_id);
        self.root.join("bodies").join(&h[..2]).join(h)
    }

    /// Writes a file under a temporary name next to `path`, then renames it into
    /// place, creating the shard directory on first use.
    fn write_atomically(
        &mut self,
        path: &Path,
        fill: impl FnOnce(&mut File) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let dir = path.parent().expect("store paths have a parent");
        self.tmp_counter += 1;
        let tmp = dir.join(format!(".tmp-{:016x}", self.random.hash_one(self.tmp_counter)));
        let mut file = match File::create_new(&tmp) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                fs::create_dir_all(dir).map_err(|e| Error::broken(&format!("creating {}", dir.display()), e))?;
                File::create_new(&tmp).map_err(|e| Error::broken(&format!("creating {}", tmp.display()), e))?
            }
            Err(e) => return Err(Error::broken(&format!("creating {}", tmp.display()), e)),
        };
        let filled = fill(&mut file);
        drop(file);
        let renamed = filled.and_then(|()| {
            fs::rename(&tmp, path).map_err(|e| Error::broken(&format!("renaming into {}", path.display()), e))
        });
        if renamed.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        renamed
    }
}

impl Backend for Disk {
    fn describe() -> Info {
        Info {
            name: "disk".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            summary: "persistent store in a directory, safe to share between concurrent go commands".into(),
            max_instances: 0,
            config_keys: vec![
                key(
                    "path",
                    "directory to keep the cache in, as the plugin sees it (default /state, the plugin's own state directory; grant others with --allow-dir)",
                ),
                key(
                    "bodies",
                    "also keep bodies, not only entries: auto (default: only when path is not /state), true or false",
                ),
                key("max-age", "remove what went unused this long (default 5d)"),
                key(
                    "max-size",
                    "with bodies: keep at most this many bytes of them, least recently used removed first (default 10GiB)",
                ),
                key("trim-interval", "trim at most this often (default 1d)"),
            ],
        }
    }

    fn open(mut config: Config) -> Result<(Self, Capabilities), Error> {
        let root = PathBuf::from(config.take("path").unwrap_or_else(|| STATE_DIR.into()));
        let bodies = match config.take("bodies").as_deref() {
            None | Some("auto") => root != Path::new(STATE_DIR),
            Some("true" | "yes" | "1") => true,
            Some("false" | "no" | "0") => false,
            Some(v) => return Err(Error::InvalidConfig(format!("bodies={v}: expected auto, true or false"))),
        };
        let max_age = config.take_duration("max-age", DEFAULT_MAX_AGE)?;
        let max_size = config.take_size("max-size", DEFAULT_MAX_SIZE)?;
        let trim_interval = config.take_duration("trim-interval", DEFAULT_TRIM_INTERVAL)?;
        config.finish()?;
        fs::create_dir_all(root.join("entries")).map_err(|e| {
            Error::InvalidConfig(format!(
                "path={}: cannot create a directory there ({e}); is it granted with --allow-dir?",
                root.display()
            ))
        })?;
        let (preopen, relative_root) = locate(&root).ok_or_else(|| {
            Error::InvalidConfig(format!(
                "path={}: not inside a granted directory (grant one with --allow-dir)",
                root.display()
            ))
        })?;
        let disk = Disk {
            root,
            preopen,
            relative_root,
            bodies,
            max_age,
            max_size,
            trim_interval,
            random: RandomState::new(),
            tmp_counter: 0,
        };
        Ok((disk, Capabilities { stores_bodies: bodies }))
    }

    fn read_entry(&mut self, action_id: &Digest) -> Result<Entry, Error> {
        // This is the whole cost of a cache hit, so it talks to the WASI
        // filesystem directly: open, one positional read, one stat. Through
        // std, each read would also create and drop a stream.
        let path = self.entry_relative(action_id);
        let file = match self.preopen.open_at(PathFlags::empty(), &path, OpenFlags::empty(), DescriptorFlags::READ) {
            Ok(f) => f,
            Err(ErrorCode::NoEntry) => return Err(Error::NotFound),
            Err(e) => return Err(Error::broken(&format!("opening {path}"), e)),
        };
        let (bytes, _) =
            file.read(MAX_ENTRY_LINE as u64, 0).map_err(|e| Error::broken(&format!("reading {path}"), e))?;
        // A line that does not parse is a miss to be overwritten, not an outage.
        let entry = std::str::from_utf8(&bytes).ok().and_then(Entry::parse).ok_or(Error::NotFound)?;
        let modified = file.stat().ok().and_then(|s| s.data_modification_timestamp);
        if modified.is_none_or(|t| is_stale(UNIX_EPOCH + Duration::new(t.seconds, t.nanoseconds))) {
            // Only trimming precision depends on this; a failure is not worth a word.
            let _ = self.preopen.set_times_at(PathFlags::empty(), &path, NewTimestamp::NoChange, NewTimestamp::Now);
        }
        Ok(entry)
    }

    fn write_entry(&mut self, action_id: &Digest, entry: Entry) -> Result<(), Error> {
        let line = entry.to_line();
        let path = self.entry_path(action_id);
        self.write_atomically(&path, |f| f.write_all(line.as_bytes()).map_err(|e| Error::broken("writing entry", e)))
    }

    fn read_body(&mut self, output_id: &Digest, size: u64, sink: &OutputStream) -> Result<(), Error> {
        let path = self.body_path(output_id);
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Err(Error::NotFound),
            Err(e) => return Err(Error::broken(&format!("opening {}", path.display()), e)),
        };
        if file.metadata().map(|m| m.len()).ok() != Some(size) {
            return Err(Error::NotFound);
        }
        copy_to_stream(&mut file, sink)?;
        if file.metadata().and_then(|m| m.modified()).is_ok_and(is_stale) {
            // Reopened for writing only now and then; failing only costs trimming precision.
            let _ = File::options().write(true).open(&path).and_then(|f| f.set_modified(SystemTime::now()));
        }
        Ok(())
    }

    fn write_body(&mut self, output_id: &Digest, size: u64, body: &InputStream) -> Result<(), Error> {
        let path = self.body_path(output_id);
        if fs::metadata(&path).map(|m| m.len() == size).unwrap_or(false) {
            return Ok(());
        }
        self.write_atomically(&path, |f| {
            let written = copy_from_stream(body, f)?;
            if written != size {
                return Err(Error::Broken(format!("body stream gave {written} bytes, expected {size}")));
            }
            Ok(())
        })
    }

    fn finish(&mut self) -> Result<(), Error> {
        let limits = trim::Limits {
            max_age: self.max_age,
            max_size: self.max_size,
            interval: self.trim_interval,
            bodies: self.bodies,
        };
        trim::step(&self.root, &limits)
    }
}

fn key(name: &str, help: &str) -> ConfigKey {
    ConfigKey { name: name.into(), help: help.into() }
}

/// Whether a file's modification time is old enough that a use should
/// refresh it (uses are recorded there, for trimming).
fn is_stale(modified: SystemTime) -> bool {
    SystemTime::now().duration_since(modified).unwrap_or_default() > TOUCH_INTERVAL
}

/// Finds the preopened directory that contains `root`, and `root` relative to
/// it (empty, or ending in `/`).
fn locate(root: &Path) -> Option<(Descriptor, String)> {
    get_directories()
        .into_iter()
        .filter_map(|(dir, guest)| {
            let rest = root.strip_prefix(&guest).ok()?;
            let rest = rest.to_str()?;
            let relative = if rest.is_empty() { String::new() } else { format!("{rest}/") };
            Some((guest.len(), dir, relative))
        })
        .max_by_key(|(len, _, _)| *len)
        .map(|(_, dir, relative)| (dir, relative))
}

export_backend!(Disk);
