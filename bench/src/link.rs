//! The remote part over an emulated network link (issue 17): for each link
//! profile, every helper+server row measured as two machines sharing a cache.
//!
//! - Machine A: a cold `go build` with an empty GOCACHE and an empty local
//!   directory for the helper, uploading to an empty server through the link.
//! - Machine B: the same build with another empty GOCACHE and local
//!   directory, fetching through the link what A left on the server.
//!
//! Each row gets a fresh server (and a fresh toxiproxy proxy in front of it)
//! in every round; rows take turns within a round, each round starting one
//! row further on (round-robin), and every figure is a median over rounds.
//! Bytes on the wire are counted on the benchmark's own loopback
//! (`netns.rs`), not by any helper.
//!
//! It owns this measurement and its table. It starts processes only through
//! `servers`, `toxiproxy` and `bounded` (the go command), never fails on a
//! timing or on one row, and never reports a figure it could not measure.

use std::fmt::Write as _;
use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::bounded;
use crate::helpers::{self, Ctx, Helper};
use crate::netns;
use crate::peers::Peers;
use crate::toxiproxy::{Link, Toxiproxy, WAN};
use crate::{Bar, Row, median};

/// What the remote part is asked to do.
pub struct Plan<'a> {
    pub host: &'a Path,
    pub work: &'a Path,
    pub pkgs: &'a [&'a str],
    pub rounds: usize,
    pub links: Vec<Link>,
    pub helpers: Vec<Helper>,
    pub peers: &'a Peers,
    /// Longest one go build may take before it is killed (and that row's
    /// round counted as failed).
    pub build_limit: Duration,
}

/// What the part leaves for the report: its tables (printed after the main
/// one) and rows for the main table (the bars issue 17 sets on WAN).
pub struct Report {
    pub tables: String,
    pub rows: Vec<Row>,
}

/// One row's measurements over the rounds of one profile.
#[derive(Default)]
struct Figures {
    /// Machine A's cold build, seconds.
    cold: Vec<f64>,
    /// Machine B's warm build, seconds.
    warm: Vec<f64>,
    /// Packages B compiled.
    compiles: Vec<usize>,
    /// Bytes on the link during A's build and during B's (`None`: unknown).
    wire_up: Vec<Option<u64>>,
    wire_down: Vec<Option<u64>>,
    /// gocp's --stats-json of A and B, last round.
    stats: Option<(Value, Value)>,
    errors: Vec<String>,
}

/// One round of one row.
struct Measured {
    cold: f64,
    warm: f64,
    compiles: usize,
    wire_up: Option<u64>,
    wire_down: Option<u64>,
    stats: Option<(Value, Value)>,
    /// Bytes of outputs in a builtin GOCACHE after its cold build.
    raw: Option<u64>,
}

pub fn run(plan: &Plan) -> Result<Report> {
    let toxiproxy = Toxiproxy::start(&plan.work.join("toxiproxy"))?;
    let compiled_seed = compile_plugins(plan)?;
    let ctx = Ctx { host: plan.host, peers: plan.peers, compiled_seed: &compiled_seed };
    let mut helpers = Vec::new();
    for &h in &plan.helpers {
        match h.missing(&ctx) {
            Some(why) => eprintln!("remote over a link: {} is left out: {why}", h.label()),
            None => helpers.push(h),
        }
    }
    if netns::lo_bytes().is_none() {
        eprintln!(
            "remote over a link: not in a network namespace of the benchmark's own, so bytes on the wire \
             cannot be told apart from the machine's other loopback traffic: reported as unknown"
        );
    }
    let mut report = Report { tables: String::new(), rows: Vec::new() };
    for link in &plan.links {
        eprintln!("remote over a link: {} ({} rows, {})...", link.describe(), helpers.len(), rounds(plan.rounds));
        let (figures, raw) = profile(plan, &ctx, &toxiproxy, link, &helpers)?;
        write_table(&mut report.tables, plan, link, &helpers, &figures, raw)?;
        if *link == WAN {
            bar_rows(&mut report.rows, plan, &helpers, &figures, raw);
        }
    }
    Ok(report)
}

/// Compiles the remote plugins once into a state directory whose
/// `compiled/` every gocp row starts with: a local directory holding no
/// outputs, as on a CI machine that keeps only `~/.cache/gocp/compiled`
/// (the README's advice), so the figures are the cache's, not Cranelift's.
fn compile_plugins(plan: &Plan) -> Result<PathBuf> {
    let seed = plan.work.join("link-compiled-seed");
    for (plugin, config) in [
        ("s3", "--config bucket=b --config endpoint=http://127.0.0.1:9"),
        ("redis", "--config url=redis://127.0.0.1:9"),
        ("http", "--config url=http://127.0.0.1:9"),
        // No credentials: only a row's own run needs them.
        ("gcs", "--config bucket=unused --config endpoint=http://127.0.0.1:9 --config credentials=none"),
        (
            "azure",
            "--config account=a --config container=unused --config endpoint=http://127.0.0.1:9/a --config credentials=none",
        ),
    ] {
        // Its input at end at once: gocp starts (compiling the plugin),
        // serves nothing and exits. Starting never contacts the server.
        let mut cmd = Command::new(plan.host);
        cmd.arg("--dir").arg(&seed).args(["--plugin", plugin]).args(config.split(' '));
        cmd.args([
            "--allow-net",
            "127.0.0.1:9",
            "--allow-env",
            "AWS_ACCESS_KEY_ID",
            "--allow-env",
            "AWS_SECRET_ACCESS_KEY",
        ]);
        cmd.envs(helpers::ENV.iter().copied());
        let done = bounded::run(&mut cmd, &format!("gocp-host --plugin {plugin}"), Duration::from_secs(300))?;
        ensure!(done.status.success(), "gocp-host --plugin {plugin} failed to start: {}", done.stderr.trim());
    }
    Ok(seed)
}

/// All rounds of one profile; the figures of each helper (in `helpers`'
/// order) and the raw bytes (from the builtin row, if it ran).
fn profile(
    plan: &Plan,
    ctx: &Ctx,
    toxiproxy: &Toxiproxy,
    link: &Link,
    helpers: &[Helper],
) -> Result<(Vec<Figures>, Option<u64>)> {
    let mut figures: Vec<Figures> = helpers.iter().map(|_| Figures::default()).collect();
    let mut raw = None;
    let base = plan.work.join(format!("link-{}", link.name.to_lowercase()));
    for round in 0..plan.rounds {
        for k in 0..helpers.len() {
            let i = (round + k) % helpers.len();
            let h = helpers[i];
            let dir = base.join(format!("r{round}-{}", h.id()));
            let name = format!("{}-r{round}-{}", link.name.to_lowercase(), h.id());
            eprintln!("  round {}/{}: {}", round + 1, plan.rounds, h.label());
            match one(plan, ctx, toxiproxy, link, h, &dir, &name) {
                Ok(m) => {
                    let f = &mut figures[i];
                    f.cold.push(m.cold);
                    f.warm.push(m.warm);
                    f.compiles.push(m.compiles);
                    f.wire_up.push(m.wire_up);
                    f.wire_down.push(m.wire_down);
                    if m.stats.is_some() {
                        f.stats = m.stats;
                    }
                    raw = raw.or(m.raw);
                }
                Err(e) => {
                    eprintln!("  {} failed in round {}: {e:#}", h.label(), round + 1);
                    figures[i].errors.push(format!("{e:#}"));
                }
            }
        }
        // Rounds are removed as they end: all of them together would hold
        // gigabytes. (Creating files right after deleting thousands is slower
        // on this machine's ext4; the rotation spreads that over the rows.)
        let _ = fs::remove_dir_all(&base);
    }
    Ok((figures, raw))
}

/// Machine A then machine B for one row, on a fresh server behind a fresh
/// proxy; both are gone when this returns, whatever happened.
fn one(
    plan: &Plan,
    ctx: &Ctx,
    toxiproxy: &Toxiproxy,
    link: &Link,
    h: Helper,
    dir: &Path,
    name: &str,
) -> Result<Measured> {
    // The proxy's port is chosen before the server starts, since
    // fake-gcs-server hands out URLs that must lead back through it. It stays
    // bound until the server runs, so that the server cannot be given it.
    let reserved = TcpListener::bind("127.0.0.1:0").context("choosing the proxy's port")?;
    let listen = reserved.local_addr()?.port();
    let server = h.start_server(ctx, &dir.join("server"), listen)?;
    drop(reserved);
    let proxy = match &server {
        Some(s) => {
            Some(toxiproxy.proxy(name, listen, s.port, link).with_context(|| format!("a proxy for {}", s.name()))?)
        }
        None => None,
    };
    let port = proxy.as_ref().map_or(0, |p| p.port);

    // Machine A: cold, uploading.
    let a_gocache = dir.join("a-gocache");
    let a_stats = dir.join("a-stats.json");
    let prog = h.gocacheprog(ctx, &dir.join("a-local"), port, &a_stats)?;
    let before = netns::lo_bytes();
    let a = go_build(plan, &a_gocache, prog.as_deref(), false)?;
    let wire_up = wire(before, netns::lo_bytes());
    let raw = (h == Helper::Builtin).then(|| output_bytes(&a_gocache));

    // Machine B: warm from the server. The builtin cache has no server: its
    // "machine B" is A again, warm from its own GOCACHE.
    let b_gocache = if h == Helper::Builtin { a_gocache.clone() } else { dir.join("b-gocache") };
    let b_stats = dir.join("b-stats.json");
    let prog = h.gocacheprog(ctx, &dir.join("b-local"), port, &b_stats)?;
    let before = netns::lo_bytes();
    let b = go_build(plan, &b_gocache, prog.as_deref(), true)?;
    let wire_down = wire(before, netns::lo_bytes());

    let stats = if h.is_gocp() { Some((read_json(&a_stats)?, read_json(&b_stats)?)) } else { None };
    Ok(Measured {
        cold: a.took.as_secs_f64(),
        warm: b.took.as_secs_f64(),
        compiles: compiles(&b.stderr),
        wire_up,
        wire_down,
        stats,
        raw,
    })
}

/// Bytes on the link between two readings of the namespace's loopback.
///
/// Everything the benchmark sends crosses `lo` twice, helper to toxiproxy
/// and toxiproxy to server (and back the same way), and `lo` counts each
/// crossing once in its transmit counter: half the difference is what one
/// link would carry, both directions together, TCP/IP headers and acks
/// included. Nothing else runs in the namespace during a build (the
/// toxiproxy API is called only between builds).
fn wire(before: Option<u64>, after: Option<u64>) -> Option<u64> {
    Some(after?.saturating_sub(before?) / 2)
}

/// `go build [-x] PKGS` in the work directory with `gocache` and, if given,
/// GOCACHEPROG `prog`.
fn go_build(plan: &Plan, gocache: &Path, prog: Option<&str>, trace: bool) -> Result<bounded::Finished> {
    let mut cmd = Command::new("go");
    cmd.arg("build");
    if trace {
        cmd.arg("-x");
    }
    cmd.args(plan.pkgs).current_dir(plan.work).env("GOCACHE", gocache).env("GOFLAGS", "");
    cmd.env("GOTOOLCHAIN", "local").env_remove("GOCACHEPROG").envs(helpers::ENV.iter().copied());
    if let Some(p) = prog {
        cmd.env("GOCACHEPROG", p);
    }
    let what = format!("go build {}", plan.pkgs.join(" "));
    let done = bounded::run(&mut cmd, &what, plan.build_limit)?;
    if !done.status.success() {
        bail!("{what} failed ({}):\n{}", done.status, bounded::tail(&done.stderr, 15));
    }
    Ok(done)
}

/// Packages compiled, counted in the output of `go build -x`, which prints
/// every command the go command runs: one run of the compile tool with `-o`
/// per package it compiles (and none for a package it takes from the cache;
/// its other uses of compile, asking `-V=full` for the tool's id, are neither
/// printed nor given `-o`). Assembly, cgo and link steps are not counted.
fn compiles(trace: &str) -> usize {
    trace
        .lines()
        .filter(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            words.windows(2).any(|w| (w[0] == "compile" || w[0].ends_with("/compile")) && w[1] == "-o")
        })
        .count()
}

/// The outputs the go command put into a builtin GOCACHE: its `*-d` files
/// (`*-a` files are the action entries, tens of bytes each).
fn output_bytes(gocache: &Path) -> u64 {
    crate::walk_files(gocache)
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with("-d"))
        .filter_map(|p| fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

fn read_json(path: &Path) -> Result<Value> {
    let text = fs::read_to_string(path).with_context(|| format!("gocp wrote no {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
}

fn rounds(n: usize) -> String {
    if n == 1 { "1 round".into() } else { format!("{n} rounds") }
}

fn mb(bytes: f64) -> String {
    format!("{:.1} MB", bytes / 1e6)
}

/// The median of the known values, if every round knew it.
fn known_median(v: &[Option<u64>]) -> Option<f64> {
    let mut known: Vec<f64> = v.iter().map(|b| b.map(|b| b as f64)).collect::<Option<_>>()?;
    (!known.is_empty()).then(|| median(&mut known))
}

fn write_table(
    out: &mut String,
    plan: &Plan,
    link: &Link,
    helpers: &[Helper],
    figures: &[Figures],
    raw: Option<u64>,
) -> Result<()> {
    let pkgs = plan.pkgs.join(" ");
    let builtin = helpers.iter().position(|&h| h == Helper::Builtin).map(|i| &figures[i]);
    let builtin_cold = builtin.filter(|f| !f.cold.is_empty()).map(|f| median(&mut f.cold.clone()));
    writeln!(out, "\nremote caches over an emulated link, {}", link.describe())?;
    writeln!(
        out,
        "machine A: cold go build {pkgs}, empty GOCACHE and helper directory, uploading; machine B: the same \
         build warm from what A uploaded, empty GOCACHE and helper directory; {}, medians",
        rounds(plan.rounds)
    )?;
    match (builtin_cold, builtin.filter(|f| !f.warm.is_empty())) {
        (Some(cold), Some(f)) => writeln!(
            out,
            "builtin: cold {cold:.2} s, warm {:.2} s (its own GOCACHE); raw bytes (outputs in a builtin GOCACHE \
             after a cold build): {}",
            median(&mut f.warm.clone()),
            raw.map_or("unknown".into(), |r| mb(r as f64))
        )?,
        _ => writeln!(out, "builtin: not measured, so there are no ratios")?,
    }
    writeln!(
        out,
        "| helper, server | cold + upload / builtin cold | warm from remote | B compiles | wire bytes up / raw | wire bytes down / raw |"
    )?;
    writeln!(out, "|---|---|---|---|---|---|")?;
    for (h, f) in helpers.iter().zip(figures) {
        if f.cold.is_empty() {
            let why = f.errors.first().map_or("no round ran", |e| e.lines().next().unwrap_or(""));
            writeln!(out, "| {} | failed: {why} | - | - | - | - |", h.label())?;
            continue;
        }
        let cold = median(&mut f.cold.clone());
        let ratio = builtin_cold.map_or("-".to_string(), |b| format!("{:.2} ({cold:.1} s)", cold / b));
        let warm = median(&mut f.warm.clone());
        let compiles = f.compiles.iter().max().copied().unwrap_or(0);
        let wire_cell = |v: &[Option<u64>]| match (*h, known_median(v), raw) {
            (Helper::Builtin, _, _) => "-".to_string(),
            (_, None, _) => "unknown".to_string(),
            (_, Some(w), Some(r)) => format!("{:.2} ({})", w / r as f64, mb(w)),
            (_, Some(w), None) => format!("? ({})", mb(w)),
        };
        let failed = if f.errors.is_empty() { String::new() } else { format!(" ({} round(s) failed)", f.errors.len()) };
        writeln!(
            out,
            "| {}{failed} | {ratio} | {warm:.2} s | {compiles} | {} | {} |",
            h.label(),
            wire_cell(&f.wire_up),
            wire_cell(&f.wire_down)
        )?;
    }
    writeln!(
        out,
        "(B compiles: packages machine B compiled, the most in any round, from `go build -x`; 0 means every \
         output came from the cache. Wire bytes: everything on the link during A's build (up) or B's (down), \
         both directions, TCP/IP headers included, counted on the loopback of the benchmark's own network \
         namespace, over the raw bytes.)"
    )?;
    // gocp's own account of where its hits came from, and what the remote cost.
    let mut first = true;
    for (h, f) in helpers.iter().zip(figures) {
        let Some((a, b)) = &f.stats else { continue };
        if first {
            writeln!(out, "gocp --stats-json, last round:")?;
            first = false;
        }
        writeln!(out, "  {}: A: {}; B: {}", h.label(), stats_line(a), stats_line(b))?;
    }
    Ok(())
}

/// The figures of one gocp run that say what the remote did; the keys being
/// added to the host are shown only when it writes them.
fn stats_line(v: &Value) -> String {
    let mut parts = Vec::new();
    for key in ["hits_local", "hits_fetched", "misses", "prefetched", "puts"] {
        parts.push(format!("{key} {}", v[key].as_u64().map_or("?".into(), |n| n.to_string())));
    }
    for key in ["remote_bytes_up", "remote_bytes_down", "remote_wait_ms"] {
        if let Some(n) = v.get(key).and_then(Value::as_u64) {
            parts.push(format!("{key} {n}"));
        }
    }
    parts.join(", ")
}

/// Rows for the main table: issue 17's bars for each gocp plugin on WAN.
fn bar_rows(rows: &mut Vec<Row>, plan: &Plan, helpers: &[Helper], figures: &[Figures], raw: Option<u64>) {
    let pkgs = plan.pkgs.join(" ");
    let Some(b) = helpers.iter().position(|&h| h == Helper::Builtin) else { return };
    if figures[b].cold.is_empty() {
        return;
    }
    let builtin_cold = median(&mut figures[b].cold.clone());
    for (h, f) in helpers.iter().zip(figures) {
        if !h.is_gocp() || f.cold.is_empty() {
            continue;
        }
        let cold = median(&mut f.cold.clone());
        rows.push(Row {
            figure: format!("WAN link: cold go build {pkgs} uploading, {} / builtin cold", h.label()),
            gocp: format!("{cold:.3} s"),
            builtin: format!("{builtin_cold:.3} s"),
            value: cold / builtin_cold,
            bar: Bar::AtMost { bar: 1.15, goal: 1.05 },
        });
        let warm = median(&mut f.warm.clone());
        rows.push(Row {
            figure: format!("WAN link: warm go build {pkgs} from the remote, empty local store, {} (s)", h.label()),
            gocp: format!("{warm:.3} s"),
            builtin: "-".into(),
            value: warm,
            bar: Bar::AtMost { bar: 1.5, goal: 0.8 },
        });
        if let (Some(w), Some(r)) = (known_median(&f.wire_up), raw) {
            rows.push(Row {
                figure: format!("WAN link: bytes on the wire for the cold upload, {} / raw", h.label()),
                gocp: mb(w),
                builtin: format!("{} raw", mb(r as f64)),
                value: w / r as f64,
                bar: Bar::AtMost { bar: 0.4, goal: 0.3 },
            });
        }
    }
}
