//! The command line: flags (each with a GOCP_* environment variable, since
//! GOCACHEPROG strings get long), start-up checks, and the end-of-run report.
//!
//! It owns turning what the user typed into settings and every configuration
//! mistake into one clear line before anything is served. It must never touch
//! the protocol streams itself beyond handing them to the server.

use std::fs::File;
use std::io::{self, BufReader, IsTerminal};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;

use crate::local_entries::LocalEntries;
use crate::plugin::{self, DirGrant, Grants, NetGrant, Plugin, Source};
use crate::server::{self, Ending, Settings};
use crate::stats::Summary;
use crate::store::{Store, TrimPolicy};

const ABOUT: &str = "Serves the go command's build cache (GOCACHEPROG) from a cache backend plugin: \
a sandboxed WebAssembly component.";

const AFTER_HELP: &str = "\
Use it by setting GOCACHEPROG for the go command:
  GOCACHEPROG=gocp-host go build ./...                       built-in `disk` plugin
  GOCACHEPROG=\"gocp-host --plugin memory\" go test ./...      another built-in plugin
  GOCACHEPROG=\"gocp-host --plugin ./b.wasm --config k=v\" ...  your own plugin

Built-in plugins: disk (persistent, the default), memory (lasts one go command).
A plugin sees only what is granted: its own directory (/state), --allow-dir grants,
no environment, no network. Writing a plugin: see wit/gocp.wit in the source.

Every option can also be set by the environment variable shown with it; options that
repeat take several space-separated values there (GOCP_CONFIG=\"a=1 b=2\").";

#[derive(Debug, Parser)]
#[command(name = "gocp-host", version, about = ABOUT, after_help = AFTER_HELP)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Subcommand>,

    /// Cache backend: a built-in plugin's name or the path of a .wasm component.
    #[arg(global = true, long, env = "GOCP_PLUGIN", default_value = "disk", value_name = "NAME|PATH")]
    pub plugin: String,

    /// Configuration for the plugin (repeatable). Unknown keys are an error.
    #[arg(global = true, long = "config", env = "GOCP_CONFIG", value_name = "KEY=VALUE", value_delimiter = ' ', value_parser = parse_key_value)]
    pub config: Vec<(String, String)>,

    /// State directory: the local store of outputs, compiled plugins, plugin data.
    /// [default: $XDG_CACHE_HOME/gocp or ~/.cache/gocp]
    #[arg(global = true, long, env = "GOCP_DIR", value_name = "DIR")]
    pub dir: Option<PathBuf>,

    /// Grant the plugin a directory, seen inside as GUEST (default: the same path);
    /// `:ro` makes it read-only (repeatable).
    #[arg(global = true, long = "allow-dir", env = "GOCP_ALLOW_DIR", value_name = "HOST[:GUEST][:ro]", value_delimiter = ' ', value_parser = parse_dir_grant)]
    pub allow_dir: Vec<DirGrant>,

    /// Let the plugin read this environment variable, e.g. a credential (repeatable).
    #[arg(global = true, long = "allow-env", env = "GOCP_ALLOW_ENV", value_name = "NAME", value_delimiter = ' ')]
    pub allow_env: Vec<String>,

    /// Let the plugin connect to HOST:PORT, over HTTP or TCP (repeatable).
    #[arg(global = true, long = "allow-net", env = "GOCP_ALLOW_NET", value_name = "HOST:PORT", value_delimiter = ' ', value_parser = NetGrant::parse)]
    pub allow_net: Vec<NetGrant>,

    /// Memory each plugin instance may use.
    #[arg(global = true, long, env = "GOCP_PLUGIN_MEMORY", value_name = "SIZE", default_value = "1GiB", value_parser = parse_size)]
    pub plugin_memory: u64,

    /// How long one plugin call may take before it counts as failed (calls moving
    /// a body get more time in proportion to its size).
    #[arg(global = true, long, env = "GOCP_PLUGIN_TIMEOUT", value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    pub plugin_timeout: Duration,

    /// Describe the plugin: what it is, its configuration keys, what it imports
    /// and which grants those need. Then exit.
    #[arg(long)]
    pub help_plugin: bool,

    /// Most plugin instances to run at once (the plugin may allow fewer).
    /// [default: the number of CPUs; 16 for a plugin that uses the network]
    #[arg(long, env = "GOCP_INSTANCES", value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub instances: Option<u16>,

    /// Local store: remove outputs not used for this long.
    #[arg(long, env = "GOCP_MAX_AGE", value_name = "DURATION", default_value = "5d", value_parser = humantime::parse_duration)]
    pub max_age: Duration,

    /// Local store: keep at most this much, least recently used removed first.
    #[arg(long, env = "GOCP_MAX_SIZE", value_name = "SIZE", default_value = "10GiB", value_parser = parse_size)]
    pub max_size: u64,

    /// Local store: look for outputs to remove at most this often.
    #[arg(long, env = "GOCP_TRIM_INTERVAL", value_name = "DURATION", default_value = "1d", value_parser = humantime::parse_duration)]
    pub trim_interval: Duration,

    /// At the end, how long the plugin may take to finish what it is doing
    /// (recording the last puts) and its own housekeeping.
    #[arg(long, env = "GOCP_DRAIN_TIMEOUT", value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

    /// Print a one-line summary at exit, and the plugin's own stderr.
    #[arg(global = true, short, long, env = "GOCP_VERBOSE")]
    pub verbose: bool,

    /// Write the run's statistics as JSON to FILE at exit.
    #[arg(long, env = "GOCP_STATS_JSON", value_name = "FILE")]
    pub stats_json: Option<PathBuf>,
}

#[derive(Debug, clap::Subcommand)]
pub enum Subcommand {
    /// Check a plugin against the contract in wit/gocp.wit and print a pass/fail
    /// table; exits 1 if any check fails. Runs with the same configuration and
    /// grants as serving, on a scratch state directory.
    PluginTest {
        /// The plugin to check (a built-in name or a .wasm file) [default: --plugin].
        #[arg(id = "plugin_to_test", value_name = "PLUGIN")]
        plugin: Option<String>,
    },
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

fn parse_size(s: &str) -> Result<u64, String> {
    s.parse::<bytesize::ByteSize>().map(|b| b.as_u64()).map_err(|e| format!("{s:?} is not a size such as 10GiB: {e}"))
}

fn parse_dir_grant(s: &str) -> Result<DirGrant, String> {
    let (rest, read_only) = match s.strip_suffix(":ro") {
        Some(rest) => (rest, true),
        None => (s, false),
    };
    let (host, guest) = match rest.split_once(':') {
        Some((h, g)) => (h, g.to_string()),
        None => (rest, rest.to_string()),
    };
    if host.is_empty() || guest.is_empty() {
        return Err(format!("expected HOST[:GUEST][:ro], got {s:?}"));
    }
    let host = Path::new(host);
    if !host.is_dir() {
        return Err(format!("{} is not a directory", host.display()));
    }
    Ok(DirGrant { host: host.to_path_buf(), guest, read_only })
}

fn default_dir() -> Result<PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        Some(xdg) => PathBuf::from(xdg),
        None => match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
            Some(home) => PathBuf::from(home).join(".cache"),
            None => bail!("no state directory: set --dir or GOCP_DIR (neither XDG_CACHE_HOME nor HOME is set)"),
        },
    };
    Ok(base.join("gocp"))
}

/// Parses the command line, serves one go command, and reports.
pub fn run() -> Result<ExitCode> {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version: requested output, not an error.
            e.print()?;
            return Ok(ExitCode::SUCCESS);
        }
        Err(e) => {
            // clap's message spans several lines; the first says it all.
            let rendered = e.render().to_string();
            let first = rendered.lines().next().unwrap_or_default();
            bail!("{}", first.trim_start_matches("error: "));
        }
    };
    let spec = match &cli.command {
        Some(Subcommand::PluginTest { plugin: Some(p) }) => p.clone(),
        _ => cli.plugin.clone(),
    };
    let source = Source::parse(&spec);
    if let Source::File(path) = &source
        && !path.exists()
    {
        let names: Vec<&str> = plugin::embedded::names().collect();
        bail!("plugin {}: no such file, and not a built-in plugin ({})", path.display(), names.join(", "));
    }
    let dir = match &cli.dir {
        Some(d) => std::path::absolute(d).with_context(|| format!("state directory {}", d.display()))?,
        None => default_dir()?,
    };
    if dir.to_str().is_none() {
        bail!("state directory {} is not valid UTF-8, which the go command needs", dir.display());
    }
    if let Some(Subcommand::PluginTest { .. }) = cli.command {
        // A scratch /state: the checks write entries the user must not inherit.
        let scratch = tempfile::tempdir().context("creating a scratch state directory")?;
        let options = plugin_options(&cli, &spec, source, &dir, scratch.path(), Some(4));
        let report = plugin::conformance::run(options)?;
        print!("{}", report.table());
        return Ok(if report.passed() { ExitCode::SUCCESS } else { ExitCode::from(1) });
    }
    if cli.help_plugin {
        print!("{}", plugin::inspect::describe(&source, &dir.join("compiled"), &dir.join("plugins"))?);
        return Ok(ExitCode::SUCCESS);
    }
    if io::stdin().is_terminal() {
        eprintln!(
            "gocp-host talks to the go command over stdin/stdout; use it as GOCACHEPROG=gocp-host (see gocp-host --help)"
        );
        return Ok(ExitCode::from(2));
    }
    let store = match Store::open(&dir) {
        Ok(store) => store,
        Err(e) => {
            // Not the user's typo but the machine's state (a full or read-only
            // disk): the build must go on, so serve it without a cache.
            eprintln!("gocp: state directory {} cannot be written ({e}); this build runs uncached", dir.display());
            let (input, output) = take_protocol_streams()?;
            let ending = server::serve_uncached(BufReader::new(input), output);
            return Ok(exit_code(ending));
        }
    };
    let plugin =
        Plugin::load(plugin_options(&cli, &spec, source, &dir, &dir.join("plugins"), cli.instances.map(usize::from)))?;
    // Bodies kept elsewhere get a local tier of entries in front (see server).
    let local = if plugin.capabilities.stores_bodies {
        match LocalEntries::open(&dir) {
            Ok(local) => Some(local),
            Err(e) => {
                eprintln!("gocp: local entries: {e} (the build goes on; every get asks the plugin)");
                None
            }
        }
    } else {
        None
    };

    let (input, output) = take_protocol_streams()?;
    let settings = Settings {
        trim: TrimPolicy { max_age: cli.max_age, max_size: cli.max_size, interval: cli.trim_interval },
        drain_timeout: cli.drain_timeout,
    };
    let report = |summary: &Summary| {
        if cli.verbose {
            eprintln!("{}", summary.line());
        }
        if let Some(path) = &cli.stats_json {
            let json = serde_json::to_vec_pretty(summary).expect("statistics serialize");
            if let Err(e) = std::fs::write(path, json) {
                eprintln!("gocp: writing statistics to {}: {e}", path.display());
            }
        }
    };
    let ending = server::serve(plugin, store, local, settings, input, output, &report);
    Ok(exit_code(ending))
}

/// How to run the plugin, from the flags: for serving and for `plugin-test`.
fn plugin_options(
    cli: &Cli,
    spec: &str,
    source: Source,
    dir: &Path,
    state_root: &Path,
    instances: Option<usize>,
) -> plugin::Options {
    plugin::Options {
        source,
        config: cli.config.clone(),
        artifact_dir: dir.join("compiled"),
        state_root: state_root.to_path_buf(),
        grants: Grants {
            dirs: cli.allow_dir.clone(),
            env: cli.allow_env.clone(),
            net: cli.allow_net.clone(),
            memory: usize::try_from(cli.plugin_memory).unwrap_or(usize::MAX),
            stderr_prefix: cli.verbose.then(|| format!("gocp plugin {}: ", short_name(spec))),
        },
        max_instances: instances,
        call_timeout: cli.plugin_timeout,
    }
}

fn exit_code(ending: Ending) -> ExitCode {
    match ending {
        Ending::Closed | Ending::EndOfInput => ExitCode::SUCCESS,
        Ending::BadInput(e) => {
            eprintln!("gocp: stopping: {e}");
            ExitCode::from(1)
        }
    }
}

/// The plugin's name as the user wrote it, without directories or `.wasm`.
fn short_name(spec: &str) -> &str {
    let base = spec.rsplit('/').next().unwrap_or(spec);
    base.strip_suffix(".wasm").unwrap_or(base)
}

/// Takes stdin and stdout for the protocol and points file descriptor 1 at
/// /dev/null, so that nothing else in the process, whatever it prints, can
/// ever corrupt the stream the go command reads.
fn take_protocol_streams() -> Result<(File, File)> {
    let input = File::from(io::stdin().as_fd().try_clone_to_owned().context("duplicating stdin")?);
    let output = File::from(io::stdout().as_fd().try_clone_to_owned().context("duplicating stdout")?);
    let null = File::options().write(true).open("/dev/null").context("opening /dev/null")?;
    rustix::stdio::dup2_stdout(&null).context("redirecting stdout")?;
    Ok((input, output))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_grants_parse() {
        let tmp = tempfile::tempdir().unwrap();
        let h = tmp.path().to_str().unwrap();
        assert_eq!(
            parse_dir_grant(&format!("{h}:/data:ro")).unwrap(),
            DirGrant { host: tmp.path().into(), guest: "/data".into(), read_only: true }
        );
        assert_eq!(
            parse_dir_grant(h).unwrap(),
            DirGrant { host: tmp.path().into(), guest: h.into(), read_only: false }
        );
        assert!(parse_dir_grant("/no/such/dir").unwrap_err().contains("not a directory"));
    }

    #[test]
    fn key_values_and_sizes_parse() {
        assert_eq!(parse_key_value("a=b=c").unwrap(), ("a".into(), "b=c".into()));
        assert!(parse_key_value("novalue").is_err());
        assert_eq!(parse_size("10GiB").unwrap(), 10 << 30);
        assert!(parse_size("lots").is_err());
    }
}
