//! The command line: flags (each with a GOCP_* environment variable, since
//! GOCACHEPROG strings get long), start-up checks, the subcommands
//! (`plugin-test`, `--help-plugin`, `trim`, `keygen`), and the end-of-run report.
//!
//! It owns turning what the user typed into settings and every configuration
//! mistake into one clear line before anything is served. It must never touch
//! the protocol streams itself beyond handing them to the server.

use std::fs::File;
use std::io::{self, BufReader, IsTerminal};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use clap::{ArgAction, CommandFactory, FromArgMatches, Parser};

mod help_plugin;
mod plugin_test;
mod trim;

use std::sync::Arc;

use crate::local::entries::LocalEntries;
use crate::local::store::{Store, TrimPolicy};
use crate::local::{LocalTier, sessions};
use crate::plugin::{self, DirGrant, Grants, NetGrant, Plugin, Source};
use crate::serve::request_log::RequestLog;
use crate::serve::{self, Compression, Ending, Settings};
use crate::stats::Summary;
use crate::trust::{self, PrivateKey, PublicKey, Trust};

const ABOUT: &str = "Serves the go command's build cache (GOCACHEPROG) from a cache backend plugin: \
a sandboxed WebAssembly component.";

const AFTER_HELP: &str = "\
Use it by setting GOCACHEPROG for the go command:
  GOCACHEPROG=gocp-host go build ./...                       built-in `disk` plugin
  GOCACHEPROG=\"gocp-host --plugin memory\" go test ./...      another built-in plugin
  GOCACHEPROG=\"gocp-host --plugin ./b.wasm --config k=v\" ...  your own plugin

Built-in plugins: {builtin} (gocp-host --plugin NAME --help-plugin for each).
A plugin sees only what is granted: its own directory (/state), --allow-dir grants,
no environment, no network. Writing a plugin: see wit/gocp.wit in the source.

Every option can also be set by the environment variable shown with it (an empty one
counts as unset); options that repeat take several space-separated values there,
quoted like GOCACHEPROG when a value holds spaces (GOCP_CONFIG=\"a=1 'b=two words'\").";

#[derive(Debug, Parser)]
#[command(name = "gocp-host", version, about = ABOUT)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Subcommand>,

    /// Cache backend: a built-in plugin's name or the path of a .wasm component.
    #[arg(global = true, long, env = "GOCP_PLUGIN", default_value = "disk", value_name = "NAME|PATH")]
    pub plugin: String,

    /// Configuration for the plugin (repeatable). Unknown keys are an error.
    #[arg(global = true, long = "config", env = "GOCP_CONFIG", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub config: Vec<(String, String)>,

    /// State directory: the local store of outputs, compiled plugins, plugin data.
    /// [default: $XDG_CACHE_HOME/gocp or ~/.cache/gocp]
    #[arg(global = true, long, env = "GOCP_DIR", value_name = "DIR")]
    pub dir: Option<PathBuf>,

    /// Grant the plugin a directory, seen inside as GUEST (default: the same path);
    /// `:ro` makes it read-only (repeatable).
    #[arg(global = true, long = "allow-dir", env = "GOCP_ALLOW_DIR", value_name = "HOST[:GUEST][:ro]", value_parser = parse_dir_grant)]
    pub allow_dir: Vec<DirGrant>,

    /// Let the plugin read this environment variable, e.g. a credential (repeatable).
    #[arg(global = true, long = "allow-env", env = "GOCP_ALLOW_ENV", value_name = "NAME")]
    pub allow_env: Vec<String>,

    /// Let the plugin connect to HOST:PORT, over HTTP or TCP (repeatable).
    #[arg(global = true, long = "allow-net", env = "GOCP_ALLOW_NET", value_name = "HOST:PORT", value_parser = NetGrant::parse)]
    pub allow_net: Vec<NetGrant>,

    /// Trust the CA certificates in this PEM file for the plugin's HTTPS
    /// requests, besides the system's (repeatable; SSL_CERT_FILE and
    /// SSL_CERT_DIR also change what the system's are).
    #[arg(global = true, long = "ca-file", env = "GOCP_CA_FILE", value_name = "FILE")]
    pub ca_file: Vec<PathBuf>,

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
    /// [default: the number of CPUs; 32 for a plugin that uses the network]
    #[arg(long, env = "GOCP_INSTANCES", value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub instances: Option<u16>,

    /// Local store: remove outputs not used for this long.
    #[arg(global = true, long, env = "GOCP_MAX_AGE", value_name = "DURATION", default_value = "5d", value_parser = humantime::parse_duration)]
    pub max_age: Duration,

    /// Local store: keep at most this much, least recently used removed first.
    #[arg(global = true, long, env = "GOCP_MAX_SIZE", value_name = "SIZE", default_value = "10GiB", value_parser = parse_size)]
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

    /// Append one JSON line per request to FILE: the command, ids, hit or miss,
    /// where it was served from, bytes and time; and one per put the plugin
    /// recorded.
    #[arg(long, env = "GOCP_LOG_REQUESTS", value_name = "FILE")]
    pub log_requests: Option<PathBuf>,

    /// Give the plugin nothing to write: outputs are kept on this machine only
    /// (builds of untrusted code, such as pull requests).
    #[arg(long, env = "GOCP_READ_ONLY")]
    pub read_only: bool,

    /// Sign every entry written with the key in FILE (from `gocp-host keygen`;
    /// readable by its owner only). GOCP_SIGN_KEY may hold the key itself instead.
    #[arg(long, env = "GOCP_SIGN_KEY_FILE", value_name = "FILE")]
    pub sign_key: Option<PathBuf>,

    /// Compress bodies sent to the plugin: `zstd`, `zstd:LEVEL` (1-19), `none`, or
    /// `auto`: zstd for plugins that reach the network, none for the others. Old
    /// entries read either way.
    #[arg(long, env = "GOCP_COMPRESS", value_name = "MODE", default_value = "auto", value_parser = parse_compress)]
    pub compress: CompressMode,

    /// After this many lookups in a row that the remote did not have, answer
    /// gets as misses at once and look them up in the background; the first
    /// one found makes gets wait again. 0: always wait.
    #[arg(long, env = "GOCP_MISS_STREAK", value_name = "N", default_value_t = crate::serve::DEFAULT_MISS_STREAK)]
    pub miss_streak: usize,

    /// Also answer gets as misses at once (as --miss-streak does) once lookups
    /// in a row that the remote did not have have kept the go command waiting
    /// this long in all: a far remote. 0: only --miss-streak's count.
    #[arg(long, env = "GOCP_MISS_WAIT", value_name = "DURATION", default_value = "100ms", value_parser = humantime::parse_duration)]
    pub miss_wait: Duration,

    /// Use only entries signed by this key: a `gocp-ed25519:...` public key or a
    /// file holding one (repeatable, to rotate keys). Without it, a signer
    /// trusts its own key.
    #[arg(long = "trust-key", env = "GOCP_TRUST_KEY", value_name = "FILE|KEY")]
    pub trust_key: Vec<String>,
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
    /// Make a key pair for signing what trusted builds write: DIR/signing.key
    /// (secret, mode 0600, never overwritten) and DIR/signing.pub; prints the
    /// public key for --trust-key.
    Keygen {
        /// Where to write the two files.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Trim the local store of --dir now, to --max-age and --max-size, and run
    /// the plugin's housekeeping (what a go command's helper starts in the
    /// background once per --trim-interval); waits for a trim in progress
    /// first, and prints what it removed from the local store.
    Trim {
        /// Started by a session, holding the trim's lock as stdin: runs at low
        /// priority and leaves a failure in objects/trim-error.
        #[arg(long, hide = true)]
        detached: bool,
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

/// Refuses a granted directory that contains the state directory or lies
/// inside it: the plugin could then rewrite the files the go command reads,
/// the local entries, or the compiled code gocp loads.
fn check_dir_grants(grants: &[DirGrant], state_dir: &Path) -> Result<()> {
    let state = resolved(state_dir);
    for grant in grants {
        let granted = resolved(&grant.host);
        if state.starts_with(&granted) || granted.starts_with(&state) {
            bail!(
                "--allow-dir {}: it overlaps the state directory {}, which only gocp may write; grant a directory outside it",
                grant.host.display(),
                state_dir.display()
            );
        }
    }
    Ok(())
}

/// `path` made absolute, with symbolic links resolved as far as it exists.
fn resolved(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut missing = Vec::new();
    let mut existing = absolute.as_path();
    loop {
        if let Ok(found) = existing.canonicalize() {
            return missing.iter().rev().fold(found, |p, name| p.join(name));
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                missing.push(name.to_owned());
                existing = parent;
            }
            _ => return absolute,
        }
    }
}

/// Writes `bytes` to `path` by renaming a complete temporary file beside it,
/// so that a reader (a CI step, a test) never sees half of it: the go
/// command may already have exited while this is written.
fn write_whole(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write as _;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new().prefix(".gocp-stats-").suffix(".tmp").tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.persist(path).map(|_| ()).map_err(|e| e.error)
}

/// The state directory the flags name, as an absolute path.
fn state_dir(cli: &Cli) -> Result<PathBuf> {
    match &cli.dir {
        Some(d) => std::path::absolute(d).with_context(|| format!("state directory {}", d.display())),
        None => default_dir(),
    }
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

/// The command line and the GOCP_* environment. An empty variable counts as
/// unset: CI templates produce them, and one must not fail every build.
/// Variables of repeated options are split here rather than by clap, since
/// the command line must never be split (GOCACHEPROG already quoted it).
/// `None` when clap printed what was asked (--help, --version).
fn parse() -> Result<Option<Cli>> {
    let builtin: Vec<&str> = plugin::builtin::names().collect();
    let mut command = Cli::command().after_help(AFTER_HELP.replace("{builtin}", &builtin.join(", ")));
    let with_env: Vec<(clap::Id, std::ffi::OsString, bool)> = command
        .get_arguments()
        .filter_map(|a| {
            Some((a.get_id().clone(), a.get_env()?.to_owned(), matches!(a.get_action(), ArgAction::Append)))
        })
        .collect();
    for (id, var, repeated) in with_env {
        let Some(value) = std::env::var_os(&var) else { continue };
        if repeated || value.to_str().is_some_and(|v| v.trim().is_empty()) {
            command = command.mut_arg(id, |a| a.env(None));
        }
    }
    let matches = match command.try_get_matches() {
        Ok(m) => m,
        Err(e) if !e.use_stderr() => {
            e.print()?;
            return Ok(None);
        }
        Err(e) => {
            // clap's message spans several lines; the first says it all.
            let rendered = e.render().to_string();
            let first = rendered.lines().next().unwrap_or_default();
            bail!("{}", first.trim_start_matches("error: "));
        }
    };
    let mut cli = Cli::from_arg_matches(&matches).map_err(|e| anyhow!("{e}"))?;
    // The words of a repeated option's variable, unless the command line gave the option.
    let words = |id: &str, var: &str| -> Result<Option<Vec<String>>> {
        if matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine) {
            return Ok(None);
        }
        let Some(value) = std::env::var_os(var) else { return Ok(None) };
        let value = value.into_string().map_err(|_| anyhow!("{var} is not valid UTF-8"))?;
        split_quoted(&value).map(Some).map_err(|e| anyhow!("{var}: {e}"))
    };
    fn each<T>(var: &str, words: Vec<String>, parse: impl Fn(&str) -> Result<T, String>) -> Result<Vec<T>> {
        words.iter().map(|w| parse(w).map_err(|e| anyhow!("{var}: {e}"))).collect()
    }
    if let Some(w) = words("config", "GOCP_CONFIG")? {
        cli.config = each("GOCP_CONFIG", w, parse_key_value)?;
    }
    if let Some(w) = words("allow_dir", "GOCP_ALLOW_DIR")? {
        cli.allow_dir = each("GOCP_ALLOW_DIR", w, parse_dir_grant)?;
    }
    if let Some(w) = words("allow_env", "GOCP_ALLOW_ENV")? {
        cli.allow_env = w;
    }
    if let Some(w) = words("allow_net", "GOCP_ALLOW_NET")? {
        cli.allow_net = each("GOCP_ALLOW_NET", w, NetGrant::parse)?;
    }
    if let Some(w) = words("ca_file", "GOCP_CA_FILE")? {
        cli.ca_file = w.into_iter().map(PathBuf::from).collect();
    }
    if let Some(w) = words("trust_key", "GOCP_TRUST_KEY")? {
        cli.trust_key = w;
    }
    Ok(Some(cli))
}

/// What `--compress` asks for.
#[derive(Debug, Clone, Copy)]
pub enum CompressMode {
    Auto,
    Set(Compression),
}

/// zstd's own default: 4.4 times smaller Go outputs, compressed at several
/// hundred MB/s per core, so an upload is never held up by it.
const DEFAULT_ZSTD_LEVEL: i32 = 3;

fn parse_compress(text: &str) -> Result<CompressMode, String> {
    match text {
        "auto" => Ok(CompressMode::Auto),
        "none" => Ok(CompressMode::Set(Compression::None)),
        "zstd" => Ok(CompressMode::Set(Compression::Zstd(DEFAULT_ZSTD_LEVEL))),
        _ => match text.strip_prefix("zstd:").map(str::parse::<i32>) {
            Some(Ok(level @ 1..=19)) => Ok(CompressMode::Set(Compression::Zstd(level))),
            _ => Err(format!("{text:?}: expected auto, none, zstd or zstd:LEVEL with LEVEL from 1 to 19")),
        },
    }
}

/// Splits an environment variable's value into words the way the go command
/// splits GOCACHEPROG: whitespace separates, single or double quotes group,
/// nothing is escaped.
fn split_quoted(s: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut quote: Option<char> = None;
    for c in s.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => word.get_or_insert_with(String::new).push(c),
            None if c == '\'' || c == '"' => {
                quote = Some(c);
                word.get_or_insert_with(String::new);
            }
            None if c.is_whitespace() => words.extend(word.take()),
            None => word.get_or_insert_with(String::new).push(c),
        }
    }
    if let Some(q) = quote {
        return Err(format!("unterminated {q} quote in {s:?}"));
    }
    words.extend(word);
    Ok(words)
}

/// The keys of this session, from --sign-key, GOCP_SIGN_KEY and --trust-key.
fn load_trust(cli: &Cli) -> Result<Trust> {
    let from_env = std::env::var("GOCP_SIGN_KEY").ok().filter(|v| !v.trim().is_empty());
    let signer = match (&cli.sign_key, from_env) {
        (Some(_), Some(_)) => {
            bail!("both --sign-key (or GOCP_SIGN_KEY_FILE) and GOCP_SIGN_KEY are set: give the signing key one way")
        }
        (Some(path), None) => Some(PrivateKey::from_file(path)?),
        (None, Some(text)) => Some(PrivateKey::from_env_value(&text)?),
        (None, None) => None,
    };
    let trusted = cli.trust_key.iter().map(|k| PublicKey::from_arg(k)).collect::<Result<Vec<_>>>()?;
    Ok(Trust::new(signer, trusted))
}

/// Refuses a configuration that would let the plugin see the signing key:
/// the variable that holds it granted, a granted directory holding its file,
/// or the key itself in a granted variable or a configuration value.
fn check_key_stays_here(cli: &Cli, trust: &Trust) -> Result<()> {
    let Some(secret) = trust.secret_text() else { return Ok(()) };
    if let Some(var) =
        cli.allow_env.iter().find(|v| *v == "GOCP_SIGN_KEY" || std::env::var(v).is_ok_and(|x| x.contains(&secret)))
    {
        bail!("--allow-env {var} would hand the signing key to the plugin: grant it other variables only");
    }
    if let Some(file) = &cli.sign_key {
        let file = resolved(file);
        if let Some(grant) = cli.allow_dir.iter().find(|g| file.starts_with(resolved(&g.host))) {
            bail!(
                "--allow-dir {} holds the signing key {}: keep the key outside granted directories",
                grant.host.display(),
                file.display()
            );
        }
    }
    if cli.config.iter().any(|(_, v)| v.contains(&secret)) {
        bail!("a --config value holds the signing key: the plugin must never see it");
    }
    Ok(())
}

/// Parses the command line, serves one go command, and reports.
pub fn run() -> Result<ExitCode> {
    let Some(cli) = parse()? else { return Ok(ExitCode::SUCCESS) };
    if let Some(Subcommand::Keygen { out }) = &cli.command {
        let public = trust::keygen(out)?;
        // stdout: this is a command of its own, not a go command's helper.
        println!("{public}");
        eprintln!(
            "gocp: wrote {} (secret: keep it in a CI secret or a file of mode 0600) and {}; trust it with --trust-key {} or GOCP_TRUST_KEY={public}",
            out.join("signing.key").display(),
            out.join("signing.pub").display(),
            out.join("signing.pub").display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(Subcommand::Trim { detached }) = &cli.command {
        return trim::run(&cli, &state_dir(&cli)?, *detached);
    }
    let spec = match &cli.command {
        Some(Subcommand::PluginTest { plugin: Some(p) }) => p.clone(),
        _ => cli.plugin.clone(),
    };
    let source = Source::parse(&spec);
    if let Source::File(path) = &source
        && !path.exists()
    {
        let names: Vec<&str> = plugin::builtin::names().collect();
        bail!("plugin {}: no such file, and not a built-in plugin ({})", path.display(), names.join(", "));
    }
    let dir = state_dir(&cli)?;
    if dir.to_str().is_none() {
        bail!("state directory {} is not valid UTF-8, which the go command needs", dir.display());
    }
    check_dir_grants(&cli.allow_dir, &dir)?;
    if let Some(Subcommand::PluginTest { .. }) = cli.command {
        // A scratch /state: the checks write entries the user must not inherit.
        let scratch = tempfile::tempdir().context("creating a scratch state directory")?;
        let options = plugin_options(&cli, &spec, source, &dir, scratch.path(), Some(4));
        let report = plugin_test::run(options, scratch.path())?;
        print!("{}", report.table());
        return Ok(if report.passed() { ExitCode::SUCCESS } else { ExitCode::from(1) });
    }
    if cli.help_plugin {
        print!("{}", help_plugin::describe(&source, &dir.join("compiled"), &dir.join("plugins"))?);
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
            let ending = serve::serve_uncached(BufReader::new(input), output);
            return Ok(exit_code(ending));
        }
    };
    // Registers this session until the process ends, so that no trim removes
    // what its go command was handed. Without it (a read-only sessions/),
    // only the trim's recent-use window protects them.
    let _lease = sessions::acquire(&dir, SystemTime::now()).ok();
    let trust = load_trust(&cli)?;
    check_key_stays_here(&cli, &trust)?;
    let plugin =
        Plugin::load(plugin_options(&cli, &spec, source, &dir, &dir.join("plugins"), cli.instances.map(usize::from)))?;
    if trust.in_use() && !plugin.carries_host_data() {
        bail!(
            "plugin `{}` is built for {}, which cannot keep the signatures --sign-key and --trust-key need: use a plugin built for gocp:cache@0.2.0",
            plugin.info.name,
            plugin.contract()
        );
    }
    // Bodies kept elsewhere get a local tier of entries in front (see
    // `local`); so does a session whose plugin could not start (it says it
    // keeps bodies), which keeps what it stores on this machine alone.
    let entries = if plugin.capabilities.stores_bodies {
        match LocalEntries::open(&dir) {
            Ok(entries) => Some(entries),
            Err(e) => {
                eprintln!("gocp: local entries: {e} (the build goes on; every get asks the plugin)");
                None
            }
        }
    } else {
        None
    };

    let request_log = match &cli.log_requests {
        Some(path) => RequestLog::open(path)?,
        None => RequestLog::off(),
    };
    let (input, output) = take_protocol_streams()?;
    let settings = Settings {
        trim: TrimPolicy { max_age: cli.max_age, max_size: cli.max_size, interval: cli.trim_interval },
        drain_timeout: cli.drain_timeout,
        call_timeout: cli.plugin_timeout,
        state_dir: dir.clone(),
        read_only: cli.read_only,
        trust,
        compression: match cli.compress {
            CompressMode::Auto if plugin.networked() => Compression::Zstd(DEFAULT_ZSTD_LEVEL),
            CompressMode::Auto => Compression::None,
            CompressMode::Set(compression) => compression,
        },
        request_log,
        miss_streak: cli.miss_streak,
        miss_wait: cli.miss_wait,
    };
    let report = |summary: &Summary| {
        if cli.verbose {
            eprintln!("{}", summary.line());
        }
        if let Some(path) = &cli.stats_json {
            let json = serde_json::to_vec_pretty(summary).expect("statistics serialize");
            if let Err(e) = write_whole(path, &json) {
                eprintln!("gocp: writing statistics to {}: {e}", path.display());
            }
        }
    };
    let ending = serve::serve(Arc::new(plugin), LocalTier::new(store, entries), settings, input, output, &report);
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
        ca_files: cli.ca_file.clone(),
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
    fn grants_overlapping_the_state_directory_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        let other = tmp.path().join("other");
        std::fs::create_dir_all(state.join("objects")).unwrap();
        std::fs::create_dir_all(&other).unwrap();
        let grant = |p: &Path| DirGrant { host: p.into(), guest: "/g".into(), read_only: false };
        for refused in [state.clone(), state.join("objects"), tmp.path().into(), PathBuf::from("/")] {
            let e = check_dir_grants(&[grant(&refused)], &state).unwrap_err().to_string();
            assert!(e.contains("overlaps the state directory"), "{e}");
        }
        // Through a symbolic link, and for a state directory not made yet.
        std::os::unix::fs::symlink(&state, tmp.path().join("link")).unwrap();
        assert!(check_dir_grants(&[grant(&tmp.path().join("link"))], &state).is_err());
        assert!(check_dir_grants(&[grant(&other)], &tmp.path().join("other/new-state")).is_err());
        assert!(check_dir_grants(&[grant(&other)], &state).is_ok());
    }

    #[test]
    fn environment_lists_split_like_gocacheprog() {
        assert_eq!(split_quoted("  a=1   b=2 ").unwrap(), ["a=1", "b=2"]);
        assert_eq!(split_quoted("'/path/build cache:/shared' x").unwrap(), ["/path/build cache:/shared", "x"]);
        assert_eq!(split_quoted(r#"k="two words" ''"#).unwrap(), ["k=two words", ""]);
        assert!(split_quoted("'open").is_err());
        assert!(split_quoted(" \t ").unwrap().is_empty());
    }

    #[test]
    fn key_values_and_sizes_parse() {
        assert_eq!(parse_key_value("a=b=c").unwrap(), ("a".into(), "b=c".into()));
        assert!(parse_key_value("novalue").is_err());
        assert_eq!(parse_size("10GiB").unwrap(), 10 << 30);
        assert!(parse_size("lots").is_err());
    }
}
