//! The cost as the store grows: a store of many small outputs (and a few
//! large ones) against a nearly empty one, and a simulated month of daily
//! builds.
//!
//! A runner's cache holds hundreds of thousands of outputs after weeks; what
//! a go command pays for that must not grow with it. Both stores hold the
//! same probe entries, so every figure compares like with like: start-up to
//! the first get answered, one get or one put at a time, the helper's peak
//! memory, and the close of a session whose trim is due (what the go command
//! waits for before it exits).
//!
//! The month runs a build a day against one state directory with small
//! limits, shifting every file time in it back a day between builds, as if a
//! day had passed; at the end the store must be within its limits and an
//! unchanged build must hit every time.
//!
//! Beside each put it writes a file of its own into the same directories of
//! the same store (`floor-*`, removed at the end): the file system's part of
//! a put, which grows with the directories and the inode tables whatever the
//! cache, so that gocp's own part can be told from it.
//!
//! It drives gocp-host only through the protocol; its only other writes into
//! a state directory are those files and the time shifts (of file times, and
//! of the time the disk plugin records in its `last-trim`).

use std::fs::{self, File, FileTimes};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, ensure};
use sha2::{Digest, Sha256};

use crate::{Bar, Host, Row, action, get_line, median, put_line};

/// Probe entries in both stores: what gets and the first get look up.
const PROBES: u64 = 1000;
/// Fills are sent in sessions of this many puts, as builds would.
const FILL_SESSION: u64 = 50_000;
/// Short sessions per store whose start-up and close are measured.
const SHORT_SESSIONS: u64 = 15;
const DAY: Duration = Duration::from_secs(24 * 3600);
/// Action numbers of each kind of output, far apart.
const PROBE_BASE: u64 = 1 << 40;
const MEASURE_BASE: u64 = 2 << 40;
const LARGE_BASE: u64 = 3 << 40;
const STABLE_BASE: u64 = 4 << 40;
const DAILY_BASE: u64 = 5 << 40;

pub struct Plan {
    /// Small outputs in the big store.
    pub outputs: u64,
    /// Large outputs in the big store, and their size.
    pub large: u64,
    pub large_size: usize,
    /// Days in the month, outputs in its daily build and how many of them
    /// change each day.
    pub days: u64,
    pub build: u64,
    pub changing: u64,
}

impl Plan {
    pub fn new(quick: bool) -> Plan {
        if quick {
            Plan { outputs: 20_000, large: 2, large_size: 1 << 20, days: 8, build: 300, changing: 30 }
        } else {
            Plan { outputs: 1_000_000, large: 4, large_size: 64 << 20, days: 30, build: 2000, changing: 200 }
        }
    }
}

/// What one session on a store costs.
struct Costs {
    /// Medians over short sessions with no trim due.
    startup_ms: f64,
    close_ms: f64,
    get_us: (f64, f64),
    put_us: (f64, f64),
    /// The benchmark's own crash-safe write of a file of the same size into
    /// the store's directories, alternating with the puts: what any cache
    /// that keeps a file per output pays the file system, gocp or not.
    floor_us: f64,
    /// A put less the file system's part written right after it: the median
    /// of the differences, gocp's own part.
    own_put_us: f64,
    peak_mib: f64,
    /// Close requested to close answered, with a trim due.
    trim_close_ms: f64,
    /// Close requested to the end of the trim it started in the background.
    trim_s: f64,
    files: u64,
    bytes: u64,
}

pub fn run(host: &Path, work: &Path, plan: &Plan) -> Result<Vec<Row>> {
    let empty = work.join("scale-empty");
    let big = work.join("scale-big");
    let drain = ["--drain-timeout", "30m"];
    // Filling takes minutes: a --work directory filled before is used again.
    let filled = work.join(format!("scale-big.filled-{}", plan.outputs));
    if !filled.exists() {
        for state in [&empty, &big] {
            let _ = fs::remove_dir_all(state);
        }
        fill(host, &empty, &drain, PROBE_BASE, PROBES, small_body)?;
        let started = Instant::now();
        fill(host, &big, &drain, 0, plan.outputs, small_body)?;
        fill(host, &big, &drain, LARGE_BASE, plan.large, |i| large_body(i, plan.large_size))?;
        fill(host, &big, &drain, PROBE_BASE, PROBES, small_body)?;
        let took = started.elapsed().as_secs_f64();
        eprintln!("  filled a store with {} outputs in {took:.0} s", plan.outputs + plan.large + PROBES);
        fs::write(&filled, b"")?;
    }

    // Each run of the benchmark on a filled store puts actions of its own:
    // a put of what is stored already is a cheaper put.
    let runs_path = work.join("scale-runs");
    let runs: u64 = fs::read_to_string(&runs_path).ok().and_then(|t| t.trim().parse().ok()).unwrap_or(0);
    fs::write(&runs_path, (runs + 1).to_string())?;
    // Twice; the second is reported (the first brings the store's
    // directories into the page cache, as on a runner that used it a moment
    // ago).
    let (mut costs, mut floor_files) = (None, Vec::new());
    for round in 0..2 {
        let fresh = MEASURE_BASE + (runs * 4 + round * 2) * PROBES;
        costs = Some(measure(host, [&empty, &big], [fresh, fresh + PROBES], &mut floor_files)?);
    }
    // Removed only now: on ext4 without a journal, a file created in the
    // minutes after many were removed is slower to create (the allocator
    // steps over the inodes just freed), which would weigh on the second
    // round's figures.
    for file in floor_files {
        fs::remove_file(&file).with_context(|| format!("removing {}", file.display()))?;
    }
    let [e, b] = &costs.expect("measured twice");
    let size = format!("{} outputs, {:.1} GiB", b.files, b.bytes as f64 / (1u64 << 30) as f64);
    let small = e.files;
    let against = |what: &str, unit: &str, e: f64, b: f64| Row {
        figure: format!("{what}, store of {size} / store of {small} outputs"),
        gocp: format!("{b:.2} {unit} / {e:.2} {unit}"),
        builtin: "-".into(),
        value: b / e,
        bar: Bar::AtMost { bar: 1.5, goal: 1.1 },
    };
    let mut rows = vec![
        against("spawn to first get answered (a hit), median", "ms", e.startup_ms, b.startup_ms),
        against("close, no trim due, median", "ms", e.close_ms, b.close_ms),
        against("one get (a hit), median", "us", e.get_us.0, b.get_us.0),
        against("one get (a hit), 99th percentile", "us", e.get_us.1, b.get_us.1),
        // A put creates a file (the body's, which the go command reads), and
        // the file system charges more for that in bigger directories and
        // fuller inode tables whatever the cache: the bar is on gocp's part.
        Row { bar: Bar::None, ..against("one put, median (context)", "us", e.put_us.0, b.put_us.0) },
        Row { bar: Bar::None, ..against("one put, 99th percentile (context)", "us", e.put_us.1, b.put_us.1) },
        Row {
            bar: Bar::None,
            ..against(
                "the file system's part of a put: a file written and renamed into the same directories by the benchmark, median (context)",
                "us",
                e.floor_us,
                b.floor_us,
            )
        },
        against(
            "gocp's own part of a put: a put less the file system's part measured after it, median",
            "us",
            e.own_put_us,
            b.own_put_us,
        ),
        against("peak memory of gocp-host", "MiB", e.peak_mib, b.peak_mib),
        Row {
            // Once per --trim-interval: the store's trim is started in the
            // background; the disk plugin's `finish` still takes one bounded
            // step of its own pass (see plugins/disk/src/trim.rs).
            figure: format!("close with a trim due, store of {size} / store of {small} outputs (context)"),
            gocp: format!("{:.2} ms / {:.2} ms", b.trim_close_ms, e.trim_close_ms),
            builtin: "-".into(),
            value: b.trim_close_ms / e.trim_close_ms,
            bar: Bar::None,
        },
        Row {
            figure: format!("the trim of the store of {size}, in the background after close (context)"),
            gocp: format!("{:.1} s (store of {small}: {:.2} s)", b.trim_s, e.trim_s),
            builtin: "-".into(),
            value: b.trim_s,
            bar: Bar::None,
        },
    ];
    rows.extend(month(host, work, plan)?);
    Ok(rows)
}

fn small_body(i: u64) -> Vec<u8> {
    format!("scale output {i}").into_bytes()
}

fn large_body(i: u64, size: usize) -> Vec<u8> {
    let mut body = vec![0u8; size];
    for (k, b) in body.iter_mut().enumerate() {
        *b = ((k as u64).wrapping_mul(2654435761).wrapping_add(i) >> 13) as u8;
    }
    body
}

/// Puts outputs `base..base+n` in sessions of `FILL_SESSION`, each closed
/// (so recorded) before the next.
fn fill(host: &Path, state: &Path, args: &[&str], base: u64, n: u64, body: impl Fn(u64) -> Vec<u8>) -> Result<()> {
    let mut done = 0;
    while done < n {
        let count = (n - done).min(FILL_SESSION);
        let (mut h, _) = Host::start_with(host, state, args)?;
        let mut puts = String::new();
        for i in done..done + count {
            puts.push_str(&put_line(i + 1, &action(base + i), &body(base + i)));
        }
        let mut stdin = h.stdin_handle()?;
        let writer = std::thread::spawn(move || stdin.write_all(puts.as_bytes()));
        for _ in 0..count {
            let l = h.line()?;
            ensure!(l.contains("\"DiskPath\""), "a put failed while filling: {l}");
        }
        writer.join().unwrap()?;
        h.close()?;
        done += count;
    }
    Ok(())
}

/// What sessions on each of `states` cost, measured side by side: every
/// short session, get and put alternates between the stores (which goes
/// first alternates too), so that the machine's noise, which on a shared
/// machine is larger than the difference sought, falls on both alike. Both
/// stores hold the probes; the puts use fresh actions from `fresh`.
fn measure(host: &Path, states: [&Path; 2], fresh: [u64; 2], floor_files: &mut Vec<PathBuf>) -> Result<[Costs; 2]> {
    let ask = |h: &mut Host, request: String| -> Result<(f64, String)> {
        let t = Instant::now();
        h.send(&request)?;
        let answer = h.line()?;
        Ok((t.elapsed().as_secs_f64() * 1e6, answer))
    };
    let order = |i: u64| if i.is_multiple_of(2) { [0, 1] } else { [1, 0] };
    // Short sessions with no trim due, as most go commands are: spawn to a
    // first get answered (a hit), and close.
    let (mut starts, mut closes) = (<[Vec<f64>; 2]>::default(), <[Vec<f64>; 2]>::default());
    for i in 0..SHORT_SESSIONS {
        for s in order(i) {
            let (mut h, started) = Host::start_with(host, states[s], &[])?;
            let (_, first) = ask(&mut h, get_line(1, &action(PROBE_BASE + i)))?;
            starts[s].push(started.elapsed().as_secs_f64() * 1000.0);
            ensure!(first.contains("\"DiskPath\""), "probe {i} was not a hit: {first}");
            let closing = Instant::now();
            h.close()?;
            closes[s].push(closing.elapsed().as_secs_f64() * 1000.0);
        }
    }
    let mut hosts = Vec::new();
    for state in states {
        make_trim_due(state)?;
        hosts.push(Host::start_with(host, state, &[])?.0);
    }
    let mut gets = <[Vec<f64>; 2]>::default();
    for i in 1..PROBES {
        for s in order(i) {
            let (us, answer) = ask(&mut hosts[s], get_line(i + 1, &action(PROBE_BASE + i)))?;
            ensure!(answer.contains("\"DiskPath\""), "probe {i} was not a hit: {answer}");
            gets[s].push(us);
        }
    }
    let (mut puts, mut floors) = (<[Vec<f64>; 2]>::default(), <[Vec<f64>; 2]>::default());
    for i in 0..PROBES {
        for s in order(i) {
            let n = fresh[s] + i;
            let (us, answer) = ask(&mut hosts[s], put_line(PROBES + i + 1, &action(n), &small_body(n)))?;
            ensure!(answer.contains("\"DiskPath\""), "a put failed: {answer}");
            puts[s].push(us);
            let (us, file) = floor_write(states[s], n)?;
            floors[s].push(us);
            floor_files.push(file);
        }
    }
    // One close at a time, each trim waited for: a trim running in the
    // background would weigh on the other store's close.
    let mut hosts = hosts.into_iter();
    let mut close = |s: usize| -> Result<Costs> {
        let h = hosts.next().expect("a host per store");
        let closing = Instant::now();
        let peak = h.close()?;
        let trim_close_ms = closing.elapsed().as_secs_f64() * 1000.0;
        wait_for_trim(states[s])?;
        let trim_s = closing.elapsed().as_secs_f64();
        let (files, bytes) = objects(states[s])?;
        // Each put paired with the file written right after it: before
        // `median` sorts either list.
        let mut own_puts: Vec<f64> = puts[s].iter().zip(&floors[s]).map(|(p, f)| p - f).collect();
        Ok(Costs {
            startup_ms: median(&mut starts[s]),
            close_ms: median(&mut closes[s]),
            get_us: (median(&mut gets[s]), percentile(&mut gets[s], 0.99)),
            put_us: (median(&mut puts[s]), percentile(&mut puts[s], 0.99)),
            own_put_us: median(&mut own_puts),
            floor_us: median(&mut floors[s]),
            peak_mib: peak as f64 / 1024.0,
            trim_close_ms,
            trim_s,
            files,
            bytes,
        })
    };
    Ok([close(0)?, close(1)?])
}

/// Writes a file as a crash-safe cache does (a temporary file, renamed)
/// into the object directory the put of output `n` went to, under a name
/// gocp never uses; how long that took, in microseconds, and the file, to be
/// removed after.
fn floor_write(state: &Path, n: u64) -> Result<(f64, PathBuf)> {
    let objects = state.join("objects");
    let output: String = Sha256::digest(small_body(n)).iter().map(|b| format!("{b:02x}")).collect();
    let name = format!("floor-{output}");
    let tmp = objects.join("tmp").join(&name);
    let path = objects.join(&output[..2]).join(&name);
    let t = Instant::now();
    let mut file = File::create_new(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(&small_body(n))?;
    drop(file);
    fs::rename(&tmp, &path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok((t.elapsed().as_secs_f64() * 1e6, path))
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Dates the last trim of the local store and of the disk plugin two days
/// back, so the session's close trims.
fn make_trim_due(state: &Path) -> Result<()> {
    let then = SystemTime::now() - 2 * DAY;
    for marker in ["objects/last-trim", "plugins/disk/last-trim"] {
        let path = state.join(marker);
        if path.exists() {
            shift_recorded_time(&path, |_| nanos(then))?;
            set_mtime(&path, then)?;
        }
    }
    Ok(())
}

/// The disk plugin records when its last trim began inside `last-trim`
/// (nanoseconds since the epoch), not in the file's time: that time is
/// moved too (to `to` of it), or a shifted day would never make its trim due.
fn shift_recorded_time(path: &Path, to: impl Fn(u64) -> u64) -> Result<()> {
    let Some(ns) = fs::read_to_string(path).ok().and_then(|t| t.trim().parse::<u64>().ok()) else { return Ok(()) };
    fs::write(path, to(ns).to_string()).with_context(|| format!("writing {}", path.display()))
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

fn set_mtime(path: &Path, t: SystemTime) -> Result<()> {
    File::open(path)
        .and_then(|f| f.set_times(FileTimes::new().set_modified(t).set_accessed(t)))
        .with_context(|| format!("setting the time of {}", path.display()))
}

/// The bodies in the local store: how many, and their bytes.
fn objects(state: &Path) -> Result<(u64, u64)> {
    let (mut files, mut bytes) = (0, 0);
    for shard in fs::read_dir(state.join("objects"))?.flatten() {
        if shard.file_name().len() != 2 || !shard.file_type()?.is_dir() {
            continue;
        }
        for f in fs::read_dir(shard.path())?.flatten() {
            files += 1;
            bytes += f.metadata()?.len();
        }
    }
    Ok((files, bytes))
}

/// Waits, at most ten minutes, for the trim a session of `state` started in
/// the background: it holds `objects/trim.lock` until done.
fn wait_for_trim(state: &Path) -> Result<()> {
    let Ok(lock) = File::open(state.join("objects/trim.lock")) else { return Ok(()) };
    let until = Instant::now() + Duration::from_secs(600);
    while lock.try_lock_shared().is_err() {
        ensure!(Instant::now() < until, "the trim of {} did not end within ten minutes", state.display());
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Every file and directory time under `dir`, moved back by `by`.
fn shift_back(dir: &Path, by: Duration) -> Result<()> {
    for entry in fs::read_dir(dir)?.flatten() {
        let path = entry.path();
        let meta = entry.metadata()?;
        if meta.is_dir() {
            shift_back(&path, by)?;
        } else if entry.file_name() == "last-trim" {
            shift_recorded_time(&path, |ns| ns.saturating_sub(by.as_nanos() as u64))?;
        }
        set_mtime(&path, meta.modified()? - by)?;
    }
    Ok(())
}

/// A build a day for `plan.days` days, with limits a month outgrows: each
/// build gets every output and puts what missed, as the go command does;
/// most outputs are the same every day, `plan.changing` are new each day.
fn month(host: &Path, work: &Path, plan: &Plan) -> Result<Vec<Row>> {
    let state = work.join("scale-month");
    let _ = fs::remove_dir_all(&state);
    let body_size = 16 << 10;
    // Room for the stable outputs and a few days of changes, not a month's.
    let stable_bytes = (plan.build - plan.changing) * body_size as u64;
    let max_size = stable_bytes + 4 * plan.changing * body_size as u64;
    let max_size_arg = max_size.to_string();
    let args = ["--max-size", &max_size_arg, "--max-age", "5d", "--trim-interval", "1d"];
    let outputs = |day: u64| -> Vec<u64> {
        let stable = (0..plan.build - plan.changing).map(|i| STABLE_BASE + i);
        stable.chain((0..plan.changing).map(|i| DAILY_BASE + day * plan.changing + i)).collect()
    };
    let mut first_hits = 0.0;
    let mut worst_close = 0.0f64;
    let mut peak_bytes = 0;
    for day in 0..plan.days {
        if day > 0 {
            shift_back(&state, DAY)?;
        }
        let (hits, close_ms) = build(host, &state, &args, &outputs(day), body_size)?;
        if day == 1 {
            first_hits = hits;
        }
        worst_close = worst_close.max(close_ms);
        peak_bytes = peak_bytes.max(objects(&state)?.1);
    }
    let (again, _) = build(host, &state, &args, &outputs(plan.days - 1), body_size)?;
    let (files, bytes) = objects(&state)?;
    eprintln!(
        "  month: day 2 hit rate {:.3}, largest store {peak_bytes} bytes (limit {max_size}), {files} bodies at the end",
        first_hits
    );
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    Ok(vec![
        Row {
            figure: format!(
                "a month of daily builds ({} outputs, {} new a day, {:.1} MiB limit): largest store after a close / limit",
                plan.build,
                plan.changing,
                mib(max_size)
            ),
            gocp: format!("{:.1} MiB, {files} bodies (largest {:.1} MiB)", mib(bytes), mib(peak_bytes)),
            builtin: "-".into(),
            value: peak_bytes as f64 / max_size as f64,
            bar: Bar::AtMost { bar: 1.0, goal: 1.0 },
        },
        Row {
            figure: "a month of daily builds: hit rate of the last day's build run again".into(),
            gocp: format!("{:.1} %", again * 100.0),
            builtin: "-".into(),
            value: again,
            bar: Bar::AtLeast { bar: 1.0, goal: 1.0 },
        },
        Row {
            figure: "a month of daily builds: slowest close, trim due every day (ms)".into(),
            gocp: format!("{worst_close:.0} ms"),
            builtin: "-".into(),
            value: worst_close,
            bar: Bar::None,
        },
    ])
}

/// One build: a get of every output, a put of each that missed. Returns the
/// hit rate and how long the close took.
fn build(host: &Path, state: &Path, args: &[&str], outputs: &[u64], body_size: usize) -> Result<(f64, f64)> {
    let (mut h, _) = Host::start_with(host, state, args)?;
    let mut hits = 0;
    let mut id = 0;
    for &n in outputs {
        id += 1;
        h.send(&get_line(id, &action(n)))?;
        let answer = h.line()?;
        if answer.contains("\"DiskPath\"") {
            hits += 1;
            continue;
        }
        id += 1;
        let mut body = format!("month output {n} ").into_bytes();
        body.resize(body_size, b'.');
        h.send(&put_line(id, &action(n), &body))?;
        let put = h.line()?;
        ensure!(put.contains("\"DiskPath\""), "a put failed: {put}");
    }
    let closing = Instant::now();
    h.close()?;
    let close_ms = closing.elapsed().as_secs_f64() * 1000.0;
    // The day ends with the trim done.
    wait_for_trim(state)?;
    Ok((hits as f64 / outputs.len() as f64, close_ms))
}
