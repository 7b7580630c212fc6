//! gocp-bench: measures gocp-host against the go command's builtin cache, side
//! by side in one run, and prints every figure next to its bar.
//!
//! Builds alternate between the two caches (A B A B ...) so that a noisy
//! neighbour hurts both alike, and every figure is a median. Nothing here
//! fails on a timing: it reports.
//!
//! The remote part also runs every remote helper over an emulated network
//! link (`link.rs`, with `toxiproxy.rs`, `servers.rs`, `helpers.rs`,
//! `peers.rs`), inside a network namespace of its own (`netns.rs`).

mod bounded;
mod helpers;
mod link;
mod netns;
mod peers;
mod remote;
mod scale;
mod servers;
mod toxiproxy;

use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use clap::Parser;
use sha2::{Digest, Sha256};

#[derive(Parser)]
#[command(about = "Benchmarks gocp-host against the go command's builtin cache")]
struct Args {
    /// The gocp-host binary to measure.
    #[arg(long, default_value = "target/release/gocp-host")]
    host: PathBuf,
    /// Warm build runs per cache (alternating); medians are reported.
    #[arg(long, default_value_t = 7)]
    runs: usize,
    /// Cold build runs per cache (each compiles everything: minutes).
    #[arg(long, default_value_t = 3)]
    cold_runs: usize,
    /// A short run that checks the benchmark works (CI): small package sets,
    /// few runs, a 64 MiB body. Its figures are not the ones to quote.
    #[arg(long)]
    quick: bool,
    /// Where to keep caches and state (a fresh temporary directory by default).
    #[arg(long)]
    work: Option<PathBuf>,
    /// Measure only these parts (repeatable); all of them by default.
    #[arg(long, value_enum)]
    only: Vec<Part>,
    /// The remote part's emulated links: lan (1 ms each way, 2 ms round
    /// trip), wan (10 ms each way, 20 ms round trip, 25 MB/s each way on
    /// every connection) or both.
    #[arg(long, value_enum, default_value = "wan")]
    link: LinkChoice,
    /// The remote part's rows over the link (repeatable); all by default.
    #[arg(long, value_enum)]
    helper: Vec<helpers::Helper>,
    /// Where the other helpers' sources are, with their build.sh
    /// [default: ../shared/peers beside this repository].
    #[arg(long)]
    peers: Option<PathBuf>,
    /// Leave the other helpers out of the remote part (nor build them).
    #[arg(long)]
    no_peers: bool,
    /// Run outside a network namespace of the benchmark's own: bytes on the
    /// wire are then unknown.
    #[arg(long)]
    no_netns: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LinkChoice {
    Lan,
    Wan,
    Both,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Part {
    Warm,
    Cold,
    Startup,
    Throughput,
    Big,
    /// The cost as the store grows (a million outputs: minutes, and 9 GB of disk).
    Scale,
    Remote,
}

/// One line of the result table.
struct Row {
    figure: String,
    gocp: String,
    builtin: String,
    value: f64,
    bar: Bar,
}

enum Bar {
    /// The value must be at most `bar`; `goal` is where we aim.
    AtMost {
        bar: f64,
        goal: f64,
    },
    AtLeast {
        bar: f64,
        goal: f64,
    },
    /// Shown for context; no bar.
    None,
}

impl Row {
    fn verdict(&self) -> &'static str {
        match self.bar {
            Bar::AtMost { bar, goal } if self.value <= goal => {
                if self.value <= bar {
                    "goal"
                } else {
                    "MISSED"
                }
            }
            Bar::AtMost { bar, .. } => {
                if self.value <= bar {
                    "ok"
                } else {
                    "MISSED"
                }
            }
            Bar::AtLeast { goal, .. } if self.value >= goal => "goal",
            Bar::AtLeast { bar, .. } => {
                if self.value >= bar {
                    "ok"
                } else {
                    "MISSED"
                }
            }
            Bar::None => "-",
        }
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

struct Bench {
    host: PathBuf,
    work: PathBuf,
    quick: bool,
}

impl Bench {
    fn gocacheprog(&self, state: &Path) -> String {
        format!("{} --dir {}", self.host.display(), state.display())
    }

    /// A warm builtin cache for `pkgs`, built once per work directory.
    fn builtin_warm_cache(&self, name: &str, pkgs: &[&str]) -> Result<PathBuf> {
        let builtin = self.work.join(format!("{name}-builtin-cache"));
        self.go_build(pkgs, &builtin, None)?;
        Ok(builtin)
    }

    /// Runs `go build PKGS` with the given caches; returns the wall time.
    fn go_build(&self, pkgs: &[&str], gocache: &Path, prog: Option<&str>) -> Result<Duration> {
        let mut cmd = Command::new("go");
        cmd.arg("build").args(pkgs).current_dir(&self.work).env("GOCACHE", gocache).env("GOFLAGS", "");
        cmd.env("GOTOOLCHAIN", "local").env_remove("GOCACHEPROG").stdout(Stdio::null()).stderr(Stdio::piped());
        if let Some(p) = prog {
            cmd.env("GOCACHEPROG", p);
        }
        let started = Instant::now();
        let out = cmd.output().context("running go")?;
        let took = started.elapsed();
        ensure!(out.status.success(), "go build {pkgs:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
        Ok(took)
    }

    /// Builds `bench/floor` (a minimal GOCACHEPROG helper in Go) into the work directory.
    fn floor_helper(&self) -> Result<PathBuf> {
        let out = self.work.join("floor-helper");
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("floor");
        let status = Command::new("go")
            .args(["build", "-o"])
            .arg(&out)
            .arg(".")
            .current_dir(&src)
            .env("GOFLAGS", "")
            .env("GOTOOLCHAIN", "local")
            .status()
            .context("building bench/floor")?;
        ensure!(status.success(), "building bench/floor failed");
        Ok(out)
    }

    /// Warm builds, alternating between gocp, the builtin cache and the
    /// floor helper on gocp's state; returns the three medians.
    fn warm(&self, name: &str, pkgs: &[&str], runs: usize, floor: &Path) -> Result<Warm> {
        let builtin = self.builtin_warm_cache(name, pkgs)?;
        let state = self.work.join(format!("{name}-gocp-state"));
        let prog = self.gocacheprog(&state);
        // Fill both caches once. With GOCACHEPROG set, the go command keeps no
        // outputs in its own GOCACHE (only the empty layout it creates): the
        // check below makes sure every hit really comes from gocp, and reusing
        // that layout keeps its creation (tens of ms) out of the comparison,
        // as a developer's machine would.
        let gocp_gocache = self.work.join(format!("{name}-gocp-gocache"));
        self.go_build(pkgs, &gocp_gocache, Some(&prog))?;
        let floor_gocache = self.work.join(format!("{name}-floor-gocache"));
        let floor_prog = format!("{} {}", floor.display(), state.display());
        self.go_build(pkgs, &floor_gocache, Some(&floor_prog))?;
        let (mut g, mut b, mut f) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..runs {
            g.push(self.go_build(pkgs, &gocp_gocache, Some(&prog))?.as_secs_f64());
            b.push(self.go_build(pkgs, &builtin, None)?.as_secs_f64());
            f.push(self.go_build(pkgs, &floor_gocache, Some(&floor_prog))?.as_secs_f64());
        }
        for gocache in [&gocp_gocache, &floor_gocache] {
            let kept = walk_files(gocache).into_iter().filter(|p| !p.ends_with("README")).count();
            ensure!(
                kept == 0,
                "the go command kept {kept} files in its own GOCACHE beside a helper: not all hits were the helper's"
            );
        }
        Ok(Warm { gocp: median(&mut g), builtin: median(&mut b), floor: median(&mut f) })
    }

    /// Cold builds from empty caches, alternating, gocp first in even runs
    /// and the builtin first in odd ones; returns (gocp, builtin) medians and
    /// the disk use of each cache after its last run. `prog` gives the
    /// GOCACHEPROG for a state directory.
    ///
    /// Every build's directories are kept until all runs are done: on this
    /// machine's ext4 (no journal) creating files right after deleting
    /// thousands is slower (the inode allocator skips recently deleted
    /// inodes), and deleting between runs put that cost on whichever build
    /// came next, always the same one.
    fn cold(
        &self,
        name: &str,
        pkgs: &[&str],
        runs: usize,
        prog: &dyn Fn(&Path) -> String,
    ) -> Result<((f64, f64), (u64, u64))> {
        let (mut g, mut b) = (Vec::new(), Vec::new());
        let mut sizes = (0, 0);
        let mut made = Vec::new();
        for i in 0..runs {
            let state = self.work.join(format!("{name}-cold-state-{i}"));
            let gocache = self.work.join(format!("{name}-cold-gocache-{i}"));
            let builtin = self.work.join(format!("{name}-cold-builtin-{i}"));
            for gocp_turn in [i % 2 == 0, i % 2 == 1] {
                if gocp_turn {
                    g.push(self.go_build(pkgs, &gocache, Some(&prog(&state)))?.as_secs_f64());
                } else {
                    b.push(self.go_build(pkgs, &builtin, None)?.as_secs_f64());
                }
            }
            // gocp's disk use is its state plus what the go command still
            // writes to its own GOCACHE alongside.
            sizes = (disk_usage(&state) + disk_usage(&gocache), disk_usage(&builtin));
            made.extend([state, gocache, builtin]);
        }
        for d in made {
            let _ = fs::remove_dir_all(d);
        }
        Ok(((median(&mut g), median(&mut b)), sizes))
    }
}

/// Medians of warm builds, in seconds.
struct Warm {
    gocp: f64,
    builtin: f64,
    /// The minimal GOCACHEPROG helper (`bench/floor`) on gocp's state.
    floor: f64,
}

/// What the remote part measured: seconds, as (gocp, builtin) medians.
struct RemoteFigures {
    /// Warm build from an empty local store, every output in Redis.
    warm_from_remote: (f64, f64),
    /// The builtin's warm cache restored by copying it into a new directory,
    /// then built from, against the builtin warm build.
    restored_then_built: (f64, f64),
    /// Cold build with the server down (its port refusing connections).
    cold_remote_down: (f64, f64),
    /// The first cold build, uploading everything (one run, for context).
    cold_uploading: f64,
}

impl Bench {
    fn remote(&self, pkgs: &[&str], runs: usize, cold_runs: usize) -> Result<RemoteFigures> {
        let mut redis = remote::Redis::start(&self.work)?;
        let flags = redis.flags();
        let prog = |state: &Path| format!("{} {flags}", self.gocacheprog(state));
        let seed = self.work.join("remote-seed-state");
        let cold_uploading = self.go_build(pkgs, &self.work.join("remote-seed-gocache"), Some(&prog(&seed)))?;

        // Another machine: a new state directory for every run, holding only
        // the compiled plugin (as a CI cache of the state directory would),
        // and a GOCACHE holding no outputs. The directories are removed only
        // at the end: on this machine's ext4 (no journal), creating files
        // right after deleting thousands is several times slower (the inode
        // allocator skips recently deleted inodes), which a fresh CI machine
        // does not see.
        let builtin = self.builtin_warm_cache("std", pkgs)?;
        let gocache = self.work.join("remote-gocache");
        let stats = self.work.join("remote-stats.json");
        let (mut g, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
        let mut made = Vec::new();
        for i in 0..runs {
            // The builtin's answer to the same situation: a GOCACHE restored
            // from elsewhere (as a CI cache step does), here by the cheapest
            // restore there is, a local copy, then the build.
            let copy = self.work.join(format!("remote-restored-gocache-{i}"));
            let started = Instant::now();
            copy_dir(&builtin, &copy)?;
            self.go_build(pkgs, &copy, None)?;
            c.push(started.elapsed().as_secs_f64());
            made.push(copy);

            let state = self.work.join(format!("remote-state-{i}"));
            copy_dir(&seed.join("compiled"), &state.join("compiled"))?;
            let prog_b = format!("{} --stats-json {}", prog(&state), stats.display());
            g.push(self.go_build(pkgs, &gocache, Some(&prog_b))?.as_secs_f64());
            let figures: serde_json::Value = serde_json::from_str(&fs::read_to_string(&stats)?)?;
            let count = |key: &str| figures[key].as_u64().unwrap_or(0);
            ensure!(
                count("misses") == 0 && count("hits_fetched") + count("prefetched") > 0,
                "a warm build from the remote had misses, or took nothing from it: {figures}"
            );
            b.push(self.go_build(pkgs, &builtin, None)?.as_secs_f64());
            made.push(state);
        }
        for dir in made {
            let _ = fs::remove_dir_all(dir);
        }
        let warm_from_remote = (median(&mut g), median(&mut b));
        let restored_then_built = (median(&mut c), warm_from_remote.1);

        redis.stop();
        let (cold_remote_down, _) = self.cold("remote-down", pkgs, cold_runs, &prog)?;
        Ok(RemoteFigures {
            warm_from_remote,
            restored_then_built,
            cold_remote_down,
            cold_uploading: cold_uploading.as_secs_f64(),
        })
    }
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for e in fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let e = e?;
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()))?;
        } else {
            fs::copy(e.path(), to.join(e.file_name()))?;
        }
    }
    Ok(())
}

fn walk_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.path().is_dir() {
            out.extend(walk_files(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

/// Bytes allocated on disk under `dir` (blocks, not apparent sizes).
fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(meta) = e.path().symlink_metadata() else {
                continue;
            };
            total += meta.blocks() * 512;
            if meta.is_dir() {
                stack.push(e.path());
            }
        }
    }
    total
}

/// gocp-host spoken to directly, as cmd/go does.
struct Host {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Host {
    fn start(host: &Path, state: &Path) -> Result<(Host, Instant)> {
        Host::start_with(host, state, &[])
    }

    fn start_with(host: &Path, state: &Path, args: &[&str]) -> Result<(Host, Instant)> {
        let started = Instant::now();
        let mut child = Command::new(host)
            .args(["--dir", state.to_str().unwrap()])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting gocp-host")?;
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut caps = String::new();
        stdout.read_line(&mut caps)?;
        ensure!(caps.contains("KnownCommands"), "unexpected first line {caps:?}");
        Ok((Host { child, stdin, stdout }, started))
    }

    fn send(&mut self, request: &str) -> Result<()> {
        self.stdin.write_all(request.as_bytes())?;
        Ok(self.stdin.flush()?)
    }

    /// Another handle on the host's stdin, for a thread that writes while
    /// this one reads.
    fn stdin_handle(&self) -> Result<fs::File> {
        self.stdin.try_clone_handle()
    }

    fn line(&mut self) -> Result<String> {
        let mut l = String::new();
        ensure!(self.stdout.read_line(&mut l)? > 0, "gocp-host closed its stdout");
        Ok(l)
    }

    /// Closes the session; returns the host's peak RSS until then, in KiB.
    fn close(mut self) -> Result<u64> {
        // Read before the close: the host exits right after answering it, and
        // an exited process has no memory figures left to read.
        let peak = peak_rss_kib(self.child.id())?;
        write!(self.stdin, "{{\"ID\":999999999,\"Command\":\"close\"}}\n\n")?;
        self.stdin.flush()?;
        self.line()?;
        drop(self.stdin);
        self.child.wait()?;
        Ok(peak)
    }
}

fn peak_rss_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no VmHWM in {path}"))
}

fn action(n: u64) -> String {
    BASE64.encode(Sha256::digest(format!("bench action {n}")))
}

fn get_line(id: u64, action: &str) -> String {
    format!("{{\"ID\":{id},\"Command\":\"get\",\"ActionID\":\"{action}\"}}\n\n")
}

fn put_line(id: u64, action: &str, body: &[u8]) -> String {
    let out = BASE64.encode(Sha256::digest(body));
    format!(
        "{{\"ID\":{id},\"Command\":\"put\",\"ActionID\":\"{action}\",\"OutputID\":\"{out}\",\"BodySize\":{}}}\n\n\"{}\"\n",
        body.len(),
        BASE64.encode(body)
    )
}

/// Spawn to first get answered, repeated; the median, in milliseconds.
fn startup(host: &Path, work: &Path, runs: usize) -> Result<f64> {
    let state = work.join("startup-state");
    // The first start compiles the plugin; every later one is what users pay.
    Host::start(host, &state)?.0.close()?;
    let mut times = Vec::new();
    for i in 0..runs {
        let (mut h, started) = Host::start(host, &state)?;
        h.stdin.write_all(get_line(1, &action(i as u64)).as_bytes())?;
        h.stdin.flush()?;
        h.line()?;
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        h.close()?;
    }
    Ok(median(&mut times))
}

/// Writes all of `requests` from another thread (as cmd/go's workers do)
/// while reading `n` responses; returns requests per second.
/// Sends `requests` all at once and reads their `n` answers; with
/// `all_hits`, each must be a hit: a miss costs the helper less than a hit,
/// so a helper that lost puts would otherwise look faster (gocp at c2be565
/// dropped recordings under load and answered 57 of 100 such gets as misses).
fn pipelined(h: &mut Host, requests: String, n: u64, all_hits: bool) -> Result<f64> {
    let mut stdin = h.stdin.try_clone_handle()?;
    let started = Instant::now();
    let writer = std::thread::spawn(move || stdin.write_all(requests.as_bytes()));
    for _ in 0..n {
        let l = h.line()?;
        ensure!(!l.contains("\"Err\""), "error response {l}");
        ensure!(!all_hits || l.contains("\"DiskPath\""), "a get of a body just put was not a hit: {l}");
    }
    writer.join().unwrap()?;
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

trait CloneHandle {
    fn try_clone_handle(&self) -> Result<fs::File>;
}

impl CloneHandle for ChildStdin {
    fn try_clone_handle(&self) -> Result<fs::File> {
        use std::os::fd::AsFd;
        Ok(fs::File::from(self.as_fd().try_clone_to_owned()?))
    }
}

/// Pipelined small puts, then pipelined gets of those entries (all hits).
fn throughput(host: &Path, work: &Path, n: u64) -> Result<(f64, f64)> {
    let state = work.join("throughput-state");
    let (mut h, _) = Host::start(host, &state)?;
    let mut puts = String::new();
    for i in 0..n {
        puts.push_str(&put_line(i + 1, &action(i), format!("small output {i}").as_bytes()));
    }
    let put_rate = pipelined(&mut h, puts, n, false)?;
    let mut gets = String::new();
    for i in 0..n {
        gets.push_str(&get_line(n + i + 1, &action(i)));
    }
    let get_rate = pipelined(&mut h, gets, n, true)?;
    h.close()?;
    Ok((put_rate, get_rate))
}

/// One body of `size` bytes put and got back; (seconds, peak RSS in MiB).
fn big_body(host: &Path, work: &Path, size: u64) -> Result<(f64, f64)> {
    let state = work.join("big-state");
    // A first run compiles the embedded plugin, whose memory glibc keeps
    // mapped: that is once per machine, not what a body costs.
    Host::start(host, &state)?.0.close()?;
    let (mut h, _) = Host::start(host, &state)?;
    let chunk: Vec<u8> = (0..3u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
    let mut hash = Sha256::new();
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        hash.update(&chunk[..n]);
        left -= n as u64;
    }
    let output = BASE64.encode(hash.finalize());
    let started = Instant::now();
    let mut stdin = h.stdin.try_clone_handle()?;
    let a = action(u64::MAX);
    let head = format!(
        "{{\"ID\":1,\"Command\":\"put\",\"ActionID\":\"{a}\",\"OutputID\":\"{output}\",\"BodySize\":{size}}}\n\n\""
    );
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        stdin.write_all(head.as_bytes())?;
        let mut left = size;
        let mut encoded = String::new();
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            encoded.clear();
            BASE64.encode_string(&chunk[..n], &mut encoded);
            stdin.write_all(encoded.as_bytes())?;
            left -= n as u64;
        }
        stdin.write_all(b"\"\n")?;
        stdin.write_all(get_line(2, &a).as_bytes())
    });
    let put = h.line()?;
    ensure!(put.contains("DiskPath"), "big put failed: {put}");
    let got = h.line()?;
    ensure!(got.contains(&format!("\"Size\":{size}")), "big get failed: {got}");
    writer.join().unwrap()?;
    let took = started.elapsed().as_secs_f64();
    let peak = h.close()? as f64 / 1024.0;
    Ok((took, peak))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let host = std::path::absolute(&args.host)?;
    ensure!(host.exists(), "{} not found: build it with `cargo build --release`", host.display());
    let wanted = |p: Part| args.only.is_empty() || args.only.contains(&p);
    if wanted(Part::Remote) {
        // Said now rather than after the parts before it have run.
        servers::tool("toxiproxy-server", "toxiproxy")?;
    }

    // The remote part's peers are built first (that needs the Go module
    // proxy), then the whole benchmark runs again inside a network namespace
    // of its own, where only its traffic crosses the loopback.
    let peer_source =
        args.peers.clone().unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/peers"));
    let peer_source = fs::canonicalize(&peer_source).unwrap_or(peer_source);
    let peers = if !wanted(Part::Remote) {
        peers::Peers::none("the remote part is not measured")
    } else if args.no_peers {
        peers::Peers::none("--no-peers")
    } else {
        peers::Peers::prepare(&peer_source, !netns::inside())
    };
    if wanted(Part::Remote) && !netns::inside() && !args.no_netns {
        let why = netns::reexec();
        eprintln!("no network namespace for the remote part ({why}): bytes on the wire will be unknown");
    }
    if netns::inside() {
        netns::setup().context("setting up the benchmark's network namespace")?;
    }
    let tmp;
    let work = match &args.work {
        Some(w) => {
            fs::create_dir_all(w)?;
            std::path::absolute(w)?
        }
        None => {
            tmp = tempfile::Builder::new().prefix("gocp-bench-").tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let bench = Bench { host: host.clone(), work: work.clone(), quick: args.quick };
    let go_version = Command::new("go").arg("version").output().context("the go command is needed")?;
    if !go_version.status.success() {
        bail!("go version failed");
    }
    let (runs, cold_runs) = if args.quick { (2, 1) } else { (args.runs, args.cold_runs) };
    let std_pkgs: &[&str] = if bench.quick { &["fmt", "encoding/json"] } else { &["std"] };
    let module: &[&str] = if bench.quick { &["cmd/internal/obj/..."] } else { &["cmd/compile/internal/..."] };
    let mut rows = Vec::new();
    let mut link_tables = String::new();
    let ratio_row = |figure: &str, (g, b): (f64, f64), bar: f64, goal: f64| Row {
        figure: figure.to_string(),
        gocp: format!("{g:.3} s"),
        builtin: format!("{b:.3} s"),
        value: g / b,
        bar: Bar::AtMost { bar, goal },
    };
    // A ratio shown for context, with no bar of its own.
    let context_row = |figure: String, (a, b): (f64, f64)| Row {
        figure,
        gocp: format!("{a:.3} s"),
        builtin: format!("{b:.3} s"),
        value: a / b,
        bar: Bar::None,
    };

    if wanted(Part::Warm) {
        eprintln!("warm builds ({runs} alternating runs each)...");
        let floor = bench.floor_helper()?;
        for (name, pkgs) in [("std", std_pkgs), ("module", module)] {
            let w = bench.warm(name, pkgs, runs, &floor)?;
            let pkgs = pkgs.join(" ");
            rows.push(ratio_row(&format!("warm go build {pkgs}, gocp / builtin"), (w.gocp, w.builtin), 1.10, 1.05));
            rows.push(context_row(
                format!("warm go build {pkgs}, minimal GOCACHEPROG helper (bench/floor) / builtin (context)"),
                (w.floor, w.builtin),
            ));
            rows.push(context_row(format!("warm go build {pkgs}, gocp / minimal helper (context)"), (w.gocp, w.floor)));
        }
    }

    if wanted(Part::Cold) {
        eprintln!("cold builds ({cold_runs} alternating runs each)...");
        let (times, (gocp_bytes, builtin_bytes)) =
            bench.cold("std", std_pkgs, cold_runs, &|state| bench.gocacheprog(state))?;
        rows.push(ratio_row(&format!("cold go build {}, gocp / builtin", std_pkgs.join(" ")), times, 1.10, 1.03));
        rows.push(Row {
            figure: format!("disk after cold go build {}, gocp / builtin", std_pkgs.join(" ")),
            gocp: format!("{:.1} MiB", gocp_bytes as f64 / 1048576.0),
            builtin: format!("{:.1} MiB", builtin_bytes as f64 / 1048576.0),
            value: gocp_bytes as f64 / builtin_bytes as f64,
            bar: Bar::AtMost { bar: 1.10, goal: 1.0 },
        });
    }

    if wanted(Part::Startup) {
        eprintln!("start-up...");
        let start_ms = startup(&host, &work, if args.quick { 10 } else { 50 })?;
        rows.push(Row {
            figure: "spawn to first get answered, median (ms)".into(),
            gocp: format!("{start_ms:.2} ms"),
            builtin: "-".into(),
            value: start_ms,
            bar: Bar::AtMost { bar: 5.0, goal: 2.0 },
        });
    }

    if wanted(Part::Throughput) {
        eprintln!("protocol throughput...");
        let n = if args.quick { 5_000 } else { 100_000 };
        let (put_rate, get_rate) = throughput(&host, &work, n)?;
        rows.push(Row {
            figure: format!("pipelined small gets (hits), per second, {n}"),
            gocp: format!("{get_rate:.0} /s"),
            builtin: "-".into(),
            value: get_rate,
            bar: Bar::AtLeast { bar: 50_000.0, goal: 150_000.0 },
        });
        rows.push(Row {
            figure: format!("pipelined small puts, per second, {n} (context)"),
            gocp: format!("{put_rate:.0} /s"),
            builtin: "-".into(),
            value: put_rate,
            bar: Bar::None,
        });
    }

    if wanted(Part::Big) {
        let size: u64 = if args.quick { 64 << 20 } else { 1 << 30 };
        eprintln!("big body ({} MiB)...", size >> 20);
        let (secs, peak) = big_body(&host, &work, size)?;
        rows.push(Row {
            figure: format!("peak host RSS during a {} MiB put + get (MiB)", size >> 20),
            gocp: format!("{peak:.0} MiB in {secs:.2} s"),
            builtin: "-".into(),
            value: peak,
            bar: Bar::AtMost { bar: 256.0, goal: 64.0 },
        });
    }

    if wanted(Part::Scale) {
        let plan = scale::Plan::new(args.quick);
        eprintln!("the store grown to {} outputs, and a month of builds...", plan.outputs);
        rows.append(&mut scale::run(&host, &work, &plan)?);
    }

    if wanted(Part::Remote) {
        eprintln!("remote cache (redis on loopback)...");
        let r = bench.remote(std_pkgs, runs, cold_runs)?;
        let pkgs = std_pkgs.join(" ");
        rows.push(ratio_row(
            &format!("warm go build {pkgs} from the remote, empty local store, gocp+redis / builtin warm"),
            r.warm_from_remote,
            2.0,
            1.3,
        ));
        rows.push(context_row(
            format!("builtin warm cache restored by a local copy, then go build {pkgs}, / builtin warm (context)"),
            r.restored_then_built,
        ));
        rows.push(ratio_row(
            &format!("cold go build {pkgs}, remote down, gocp+redis / builtin"),
            r.cold_remote_down,
            1.25,
            1.10,
        ));
        rows.push(Row {
            figure: format!("cold go build {pkgs} uploading to redis, one run (context)"),
            gocp: format!("{:.3} s", r.cold_uploading),
            builtin: "-".into(),
            value: r.cold_uploading,
            bar: Bar::None,
        });

        let links = match args.link {
            LinkChoice::Lan => vec![toxiproxy::LAN],
            LinkChoice::Wan => vec![toxiproxy::WAN],
            LinkChoice::Both => vec![toxiproxy::LAN, toxiproxy::WAN],
        };
        // Each round holds a cold and a warm build of every row.
        let rounds = runs.min(cold_runs).max(1);
        let plan = link::Plan {
            host: &host,
            work: &work,
            pkgs: std_pkgs,
            rounds,
            links,
            helpers: if args.helper.is_empty() { helpers::ALL.to_vec() } else { args.helper.clone() },
            peers: &peers,
            build_limit: Duration::from_secs(if args.quick { 300 } else { 1200 }),
        };
        let mut report = link::run(&plan)?;
        rows.append(&mut report.rows);
        link_tables = report.tables;
    }

    let mut table = String::new();
    writeln!(table, "\n{}", String::from_utf8_lossy(&go_version.stdout).trim())?;
    writeln!(table, "| figure | gocp | builtin | value | bar | goal | verdict |")?;
    writeln!(table, "|---|---|---|---|---|---|---|")?;
    for r in &rows {
        let (bar, goal) = match r.bar {
            Bar::AtMost { bar, goal } => (format!("<= {bar}"), format!("{goal}")),
            Bar::AtLeast { bar, goal } => (format!(">= {bar}"), format!("{goal}")),
            Bar::None => ("-".into(), "-".into()),
        };
        writeln!(
            table,
            "| {} | {} | {} | {:.3} | {bar} | {goal} | {} |",
            r.figure,
            r.gocp,
            r.builtin,
            r.value,
            r.verdict()
        )?;
    }
    table.push_str(&link_tables);
    if args.quick {
        writeln!(table, "\n(--quick: a check that the benchmark runs, not figures to quote)")?;
    }
    print!("{table}");
    Ok(())
}
