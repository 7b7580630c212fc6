//! Trimming the cache directory in bounded steps.
//!
//! A shared directory can hold hundreds of thousands of files, more than one
//! `finish` call can look at before its deadline, and a trim that restarts
//! from scratch each time never ends. So a trim is a *pass* over the 256
//! shard directories, done a few shards at a time: each `finish` works for at
//! most [`BUDGET`], saves where it stopped in `trim-pass`, and the next one
//! (in this go command or a later one) carries on. Only one instance of any
//! process works on a pass at a time (`trim.lock`).
//!
//! A pass removes entries and bodies unused for `max-age` and temporary files
//! a killed writer left. With bodies it also keeps their total under
//! `max-size`, least recently used first: that needs the whole directory's
//! picture, so the pass first goes over every shard adding up body bytes by
//! age in hours, then, if the total is over the limit, goes over them again
//! removing the oldest hours whole and from the hour where the limit falls
//! just the bytes that are too many. An hour is as fine as the order can be:
//! a use refreshes a file's time at most hourly.
//!
//! A pass starts when the last one began more than `trim-interval` ago (a
//! time in the future, from a clock that was ahead, counts as long ago). A
//! pass still unfinished after a whole interval is said once per interval,
//! as an error of `finish`: the directory is then growing faster than it is
//! trimmed.
//!
//! It owns `last-trim`, `trim-pass` and `trim.lock`, and removes files only
//! under `entries/` and `bodies/`.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gocp_plugin_sdk::Error;

/// Work per `finish`: small against any sensible call timeout, since the go
/// command waits for `finish` before it exits.
pub const BUDGET: Duration = Duration::from_millis(150);
/// A lock older than this was left by a process that died while trimming.
const STALE_LOCK: Duration = Duration::from_secs(600);
/// Temporary files older than this were left by a writer that was killed.
const STALE_TMP: Duration = Duration::from_secs(3600);
const HOUR: u64 = 3600;
const SHARDS: u16 = 256;

pub struct Limits {
    pub max_age: Duration,
    /// With bodies: at most this many bytes of them.
    pub max_size: u64,
    pub interval: Duration,
    pub bodies: bool,
}

/// A pass in progress, as saved in `trim-pass`.
#[derive(Debug, Default, PartialEq)]
struct Pass {
    started_ns: u64,
    /// Adding up bodies (false), then removing the oldest (true).
    evicting: bool,
    /// The next shard to look at.
    shard: u16,
    /// Body bytes by age in whole hours at `started_ns`.
    bytes_by_age: BTreeMap<u64, u64>,
    /// While evicting: bodies older than this many hours go, and of those
    /// exactly this old, `evict_bytes` more.
    evict_age: u64,
    evict_bytes: u64,
    /// When falling behind was last said.
    warned_ns: u64,
}

/// Trims for at most [`BUDGET`], resuming the pass in progress or starting
/// one when it is due.
pub fn step(root: &Path, limits: &Limits) -> Result<(), Error> {
    let now = SystemTime::now();
    let mut pass = match read(&root.join("trim-pass")).and_then(|t| Pass::parse(&t)) {
        Some(pass) => pass,
        None if is_due(read(&root.join("last-trim")), now, limits.interval) => {
            Pass { started_ns: nanos(now), ..Default::default() }
        }
        None => return Ok(()),
    };
    let Some(_lock) = Lock::take(&root.join("trim.lock"))? else { return Ok(()) };
    let until = Instant::now() + BUDGET;
    loop {
        if pass.evicting {
            evict_shard(root, &mut pass)?;
        } else {
            scan_shard(root, &mut pass, limits, now)?;
        }
        pass.shard += 1;
        if pass.shard == SHARDS {
            pass.shard = 0;
            let over = !pass.evicting && limits.bodies && plan_eviction(&mut pass, limits.max_size);
            if !over {
                write(&root.join("last-trim"), &pass.started_ns.to_string())?;
                remove_if_present(&root.join("trim-pass"))?;
                return Ok(());
            }
            pass.evicting = true;
        }
        if Instant::now() >= until {
            break;
        }
    }
    // Saved once per step: a step cut short loses its own progress at most.
    write(&root.join("trim-pass"), &pass.to_line())?;
    let begun = UNIX_EPOCH + Duration::from_nanos(pass.started_ns);
    let warned = UNIX_EPOCH + Duration::from_nanos(pass.warned_ns);
    if elapsed(begun, now) > limits.interval && elapsed(warned, now) > limits.interval {
        pass.warned_ns = nanos(now);
        write(&root.join("trim-pass"), &pass.to_line())?;
        let days = elapsed(begun, now).as_secs_f64() / 86_400.0;
        return Err(Error::Broken(format!(
            "trimming {} is behind: a pass begun {days:.1} days ago is at shard {} of {SHARDS} (it goes on at every run)",
            root.display(),
            pass.shard
        )));
    }
    Ok(())
}

/// Whether a pass is due, given the last one's start. A start in the future
/// says nothing (the clock was ahead then): due.
fn is_due(last_trim: Option<String>, now: SystemTime, interval: Duration) -> bool {
    let Some(ns) = last_trim.and_then(|t| t.trim().parse::<u64>().ok()) else { return true };
    match now.duration_since(UNIX_EPOCH + Duration::from_nanos(ns)) {
        Ok(since) => since >= interval,
        Err(_) => true,
    }
}

/// Removes what went unused too long in one shard, and adds up the bodies kept.
fn scan_shard(root: &Path, pass: &mut Pass, limits: &Limits, now: SystemTime) -> Result<(), Error> {
    let started = UNIX_EPOCH + Duration::from_nanos(pass.started_ns);
    for (path, modified, _) in shard_files(&root.join("entries"), pass.shard)? {
        if is_stale(&path, modified, now, limits.max_age) {
            remove_if_present(&path)?;
        }
    }
    if !limits.bodies {
        return Ok(());
    }
    for (path, modified, len) in shard_files(&root.join("bodies"), pass.shard)? {
        if is_stale(&path, modified, now, limits.max_age) {
            remove_if_present(&path)?;
        } else if !is_tmp(&path) {
            *pass.bytes_by_age.entry(elapsed(modified, started).as_secs() / HOUR).or_default() += len;
        }
    }
    Ok(())
}

/// After the bodies are added up: if they exceed `max_size`, which of them
/// go (see `Pass::evict_age`). False if nothing needs to go.
fn plan_eviction(pass: &mut Pass, max_size: u64) -> bool {
    let total: u64 = pass.bytes_by_age.values().sum();
    let Some(mut over) = total.checked_sub(max_size).filter(|&o| o > 0) else { return false };
    for (&age, &bytes) in pass.bytes_by_age.iter().rev() {
        (pass.evict_age, pass.evict_bytes) = (age, over);
        if bytes >= over {
            break;
        }
        over -= bytes;
    }
    true
}

fn evict_shard(root: &Path, pass: &mut Pass) -> Result<(), Error> {
    let started = UNIX_EPOCH + Duration::from_nanos(pass.started_ns);
    for (path, modified, len) in shard_files(&root.join("bodies"), pass.shard)? {
        let age = elapsed(modified, started).as_secs() / HOUR;
        if is_tmp(&path) || age < pass.evict_age || (age == pass.evict_age && pass.evict_bytes == 0) {
            continue;
        }
        remove_if_present(&path)?;
        if age == pass.evict_age {
            pass.evict_bytes = pass.evict_bytes.saturating_sub(len);
        }
    }
    Ok(())
}

fn is_stale(path: &Path, modified: SystemTime, now: SystemTime, max_age: Duration) -> bool {
    elapsed(modified, now) > max_age || (is_tmp(path) && elapsed(modified, now) > STALE_TMP)
}

/// The files of one shard directory (`xx/` under `dir`): path, time, size.
fn shard_files(dir: &Path, shard: u16) -> Result<Vec<(PathBuf, SystemTime, u64)>, Error> {
    let dir = dir.join(format!("{shard:02x}"));
    let listing = match fs::read_dir(&dir) {
        Ok(l) => l,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::broken(&format!("listing {}", dir.display()), e)),
    };
    Ok(listing
        .flatten()
        .filter_map(|f| {
            let meta = f.metadata().ok().filter(|m| m.is_file())?;
            Some((f.path(), meta.modified().unwrap_or(UNIX_EPOCH), meta.len()))
        })
        .collect())
}

fn is_tmp(path: &Path) -> bool {
    path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(".tmp-"))
}

fn elapsed(since: SystemTime, now: SystemTime) -> Duration {
    now.duration_since(since).unwrap_or_default()
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

fn read(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok()
}

/// Writes a small state file whole: by rename, so a reader never sees half.
fn write(path: &Path, text: &str) -> Result<(), Error> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text)
        .and_then(|()| fs::rename(&tmp, path))
        .map_err(|e| Error::broken(&format!("writing {}", path.display()), e))
}

fn remove_if_present(path: &Path) -> Result<(), Error> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::broken(&format!("removing {}", path.display()), e)),
    }
}

impl Pass {
    fn to_line(&self) -> String {
        let ages: Vec<String> = self.bytes_by_age.iter().map(|(age, bytes)| format!("{age}:{bytes}")).collect();
        format!(
            "v2 {} {} {} {} {} {} {}\n",
            self.started_ns,
            u8::from(self.evicting),
            self.shard,
            self.evict_age,
            self.evict_bytes,
            self.warned_ns,
            ages.join(",")
        )
    }

    fn parse(text: &str) -> Option<Pass> {
        let mut f = text.trim_end_matches('\n').split(' ');
        if f.next()? != "v2" {
            return None;
        }
        let mut number = || f.next()?.parse::<u64>().ok();
        let (started_ns, evicting, shard, evict_age, evict_bytes, warned_ns) =
            (number()?, number()?, number()?, number()?, number()?, number()?);
        let bytes_by_age = match f.next() {
            None | Some("") => BTreeMap::new(),
            Some(ages) => ages
                .split(',')
                .map(|pair| {
                    let (age, bytes) = pair.split_once(':')?;
                    Some((age.parse().ok()?, bytes.parse().ok()?))
                })
                .collect::<Option<_>>()?,
        };
        let shard = u16::try_from(shard).ok().filter(|&s| s < SHARDS)?;
        Some(Pass { started_ns, evicting: evicting == 1, shard, bytes_by_age, evict_age, evict_bytes, warned_ns })
    }
}

/// The right to trim, held while trimming: a file made with `create_new`.
struct Lock(PathBuf);

impl Lock {
    /// `None` if someone else is trimming now.
    fn take(path: &Path) -> Result<Option<Lock>, Error> {
        for _ in 0..2 {
            match File::create_new(path) {
                Ok(_) => return Ok(Some(Lock(path.to_path_buf()))),
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                    let age = fs::metadata(path).and_then(|m| m.modified()).map(|t| elapsed(t, SystemTime::now()));
                    if age.is_ok_and(|age| age < STALE_LOCK) {
                        return Ok(None);
                    }
                    // Left by a process that died trimming (or just removed): take it over.
                    remove_if_present(path)?;
                }
                Err(e) => return Err(Error::broken(&format!("creating {}", path.display()), e)),
            }
        }
        Ok(None)
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pass_survives_being_saved() {
        let pass = Pass {
            started_ns: 17,
            evicting: true,
            shard: 255,
            bytes_by_age: [(0, 10), (30, 5_000_000_000)].into(),
            evict_age: 3,
            evict_bytes: 7,
            warned_ns: 4,
        };
        assert_eq!(Pass::parse(&pass.to_line()), Some(pass));
        assert_eq!(Pass::parse("v2 1 0 256 0 0 0 \n"), None, "no such shard");
        assert_eq!(Pass::parse("v2 1 0"), None);
    }

    #[test]
    fn eviction_keeps_the_most_recent_bodies_that_fit() {
        let mut pass = Pass { bytes_by_age: [(0, 5), (2, 5), (7, 5)].into(), ..Default::default() };
        assert!(!plan_eviction(&mut pass, 15), "it all fits");
        assert!(plan_eviction(&mut pass, 10));
        assert_eq!((pass.evict_age, pass.evict_bytes), (7, 5), "the hour 7 hours ago goes");
        assert!(plan_eviction(&mut pass, 7));
        assert_eq!((pass.evict_age, pass.evict_bytes), (2, 3), "then 3 of the 5 bytes 2 hours old");
        assert!(plan_eviction(&mut pass, 0));
        assert_eq!((pass.evict_age, pass.evict_bytes), (0, 5), "everything goes");
    }

    #[test]
    fn a_last_trim_in_the_future_is_due() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let day = Duration::from_secs(86_400);
        let at = |t: SystemTime| Some(nanos(t).to_string());
        assert!(is_due(None, now, day));
        assert!(!is_due(at(now - day / 2), now, day));
        assert!(is_due(at(now - day * 2), now, day));
        assert!(is_due(at(now + day * 30), now, day));
    }
}
