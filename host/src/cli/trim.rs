//! `gocp-host trim`: trims the local tier now, then runs the plugin's
//! housekeeping until it has none left. A session whose trim is due starts
//! it with `--detached` (see `local::trimmer`), so that no go command waits.
//!
//! It owns only that sequence; what is removed is the local tier's and the
//! plugin's to decide. Detached, it never writes to stdout or stderr (they
//! are closed): a failure goes where the next session says it.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};

use super::{Cli, plugin_options};
use crate::backend::{Backend, Deadline, Progress};
use crate::local::store::TrimPolicy;
use crate::local::trimmer;
use crate::plugin::{Plugin, Source};

/// Trims `dir` now, whatever the interval.
pub fn run(cli: &Cli, dir: &Path, detached: bool) -> Result<ExitCode> {
    let policy = TrimPolicy { max_age: cli.max_age, max_size: cli.max_size, interval: Duration::ZERO };
    let report = trimmer::run(dir, &policy, detached).map_err(|e| anyhow!(e))?;
    // A read-only session's trim leaves the plugin's storage alone.
    let housekept = if cli.read_only { Ok(()) } else { housekeeping(cli, dir) };
    if let Err(e) = housekept {
        let why = format!("the plugin's housekeeping: {e:#}");
        if !detached {
            bail!(why);
        }
        trimmer::record_failure(dir, &why);
    }
    if !detached {
        // stdout: this is a command of its own, not a go command's helper.
        println!(
            "removed {} files ({}); kept {}",
            report.removed_files,
            bytesize::ByteSize(report.removed_bytes),
            bytesize::ByteSize(report.kept_bytes)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// How long `gocp-host trim` keeps calling the plugin's `finish`, at most.
const HOUSEKEEPING_LIMIT: Duration = Duration::from_secs(600);
/// A `finish` this quick had no housekeeping left to do.
const HOUSEKEEPING_DONE: Duration = Duration::from_millis(50);

/// Calls the plugin's `finish` until it has no housekeeping left: a plugin
/// that trims in bounded steps (the disk plugin: a step per `finish`, so no
/// go command waits long for one) finishes its pass here, away from builds.
fn housekeeping(cli: &Cli, dir: &Path) -> Result<()> {
    let plugin =
        Plugin::load(plugin_options(cli, &cli.plugin, Source::parse(&cli.plugin), dir, &dir.join("plugins"), Some(1)))?;
    if let Some(why) = plugin.unavailable() {
        bail!("the plugin could not start: {why}");
    }
    let progress = Progress::default();
    let mut instance = plugin.start(&Deadline::start(cli.plugin_timeout, &progress)).map_err(|e| anyhow!("{e}"))?;
    let until = Instant::now() + HOUSEKEEPING_LIMIT;
    loop {
        let began = Instant::now();
        instance.finish(&Deadline::start(cli.plugin_timeout, &progress)).map_err(|e| anyhow!("finish: {e}"))?;
        if began.elapsed() < HOUSEKEEPING_DONE || Instant::now() >= until {
            return Ok(());
        }
    }
}
