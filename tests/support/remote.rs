//! What a team sharing a remote cache would notice, as scenarios any remote
//! plugin must pass against its real server: two machines sharing one cache,
//! the server going away mid-build, and wrong credentials.
//!
//! A server for a scenario implements [`RemoteServer`] (see `servers/`). The
//! scenarios drive the real go command through gocp-host; they never look at
//! the server's own storage, only at what the go command and gocp report.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::*;

/// How gocp-host reaches one backend: its flags and environment.
#[derive(Clone, Debug, Default)]
pub struct Backend {
    /// `--plugin`, `--config`, `--allow-net`, `--allow-env` and their values,
    /// one word each (no spaces: they end up in GOCACHEPROG).
    pub args: Vec<String>,
    /// Variables for gocp-host, such as the credentials `--allow-env` names.
    pub env: Vec<(String, String)>,
}

impl Backend {
    /// The same backend reached through 127.0.0.1:`to` (a proxy) instead of
    /// 127.0.0.1:`from`, in every URL and grant.
    pub fn via(&self, from: u16, to: u16) -> Backend {
        let (from, to) = (format!("127.0.0.1:{from}"), format!("127.0.0.1:{to}"));
        Backend { args: self.args.iter().map(|a| a.replace(&from, &to)).collect(), env: self.env.clone() }
    }
}

/// A cache server running on 127.0.0.1 for one test. Dropping it stops it.
pub trait RemoteServer {
    /// The port it listens on, on 127.0.0.1.
    fn port(&self) -> u16;
    /// How many objects (entries and bodies) it holds, as the server itself
    /// counts them: what proves a client wrote nothing.
    fn stored(&self) -> usize;
    /// Flags and environment that reach this server with valid credentials.
    fn backend(&self) -> Backend;
    /// The same server, with credentials it refuses.
    fn backend_with_bad_credentials(&self) -> Backend;
    /// Stops the server at once, as an outage would (the process is killed).
    fn stop(&mut self);
}

/// One developer machine or CI runner: its own gocp state and GOCACHE.
pub struct Machine {
    pub root: PathBuf,
}

impl Machine {
    pub fn new(root: &Path) -> Machine {
        fs::create_dir_all(root.join("gocache")).unwrap();
        Machine { root: root.to_path_buf() }
    }

    pub fn stats_path(&self) -> PathBuf {
        self.root.join("stats.json")
    }

    /// A go command in `dir` caching through gocp-host with `backend`.
    pub fn go(&self, backend: &Backend, dir: &Path, args: &[&str]) -> Command {
        let mut prog =
            format!("{BIN} --dir {} --stats-json {}", self.root.join("gocp").display(), self.stats_path().display());
        for arg in &backend.args {
            assert!(!arg.contains(char::is_whitespace), "GOCACHEPROG words cannot hold spaces: {arg:?}");
            prog.push(' ');
            prog.push_str(arg);
        }
        let mut cmd = go_command(dir, &self.root.join("gocache"), Some(&prog), args);
        for (k, v) in &backend.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Runs a go command to completion; fails the test if it fails.
    pub fn run(&self, backend: &Backend, dir: &Path, args: &[&str]) -> Output {
        let out = self.go(backend, dir, args).output_within(COMMAND_LIMIT);
        assert!(
            out.status.success(),
            "go {args:?} failed:\nstdout:\n{}\nstderr:\n{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        out
    }

    /// The statistics gocp-host wrote for the last go command.
    pub fn stats(&self) -> Value {
        serde_json::from_slice(&fs::read(self.stats_path()).expect("gocp-host wrote --stats-json")).unwrap()
    }

    pub fn objects(&self) -> usize {
        files_under(&self.root.join("gocp").join("objects"))
            .iter()
            .filter(|p| !p.starts_with(self.root.join("gocp/objects/tmp")))
            .count()
    }
}

/// Lines gocp-host printed, out of a go command's stderr.
pub fn gocp_lines(stderr: &[u8]) -> Vec<String> {
    text(stderr).lines().filter(|l| l.starts_with("gocp")).map(str::to_string).collect()
}

fn count(stats: &Value, key: &str) -> u64 {
    stats[key].as_u64().unwrap_or_else(|| panic!("stats have no {key}: {stats}"))
}

/// Machine A builds and tests a module; machine B, with an empty local store,
/// an empty GOCACHE and its own checkout elsewhere, then compiles nothing and
/// gets every test result from the cache. `-trimpath` makes the action ids
/// independent of where each machine checked the module out.
pub fn shared_cache(server: &dyn RemoteServer) {
    let tmp = tempfile::tempdir().unwrap();
    let backend = server.backend();
    let (a, b) = (Machine::new(&tmp.path().join("a")), Machine::new(&tmp.path().join("b")));
    let (src_a, src_b) = (tmp.path().join("a/src"), tmp.path().join("b/checkout/src"));
    write_module(&src_a);
    write_module(&src_b);

    let out = a.run(&backend, &src_a, &["build", "-trimpath", "./..."]);
    assert_eq!(gocp_lines(&out.stderr), Vec::<String>::new(), "gocp stays quiet");
    a.run(&backend, &src_a, &["test", "-trimpath", "./..."]);
    let stats = a.stats();
    assert!(count(&stats, "puts") > 0, "A stored its outputs: {stats}");
    assert_eq!(count(&stats, "plugin_errors") + count(&stats, "plugin_timeouts"), 0, "{stats}");

    let out = b.run(&backend, &src_b, &["build", "-x", "-trimpath", "./..."]);
    assert_eq!(compile_steps(&text(&out.stderr)), Vec::<&str>::new(), "B compiled nothing");
    let stats = b.stats();
    // Not every get is a hit: the go command's module index keys a few
    // records by the checkout's absolute directory, which differs per machine.
    assert!(count(&stats, "hits_fetched") + count(&stats, "prefetched") > 0, "B's hits came from the remote: {stats}");
    // A's sessions left a manifest of what they used: B's build found it and
    // brought outputs into its local tier ahead of its go command's requests.
    assert!(count(&stats, "manifest_items") > 0 && count(&stats, "prefetched") > 0, "B prefetched: {stats}");

    let out = b.run(&backend, &src_b, &["test", "-trimpath", "./..."]);
    let stdout = text(&out.stdout);
    let tested: Vec<&str> = stdout.lines().filter(|l| l.starts_with("ok ")).collect();
    assert_eq!(tested.len(), 3, "{stdout}");
    assert!(tested.iter().all(|l| l.ends_with("(cached)")), "B's test results came from the cache:\n{stdout}");
    assert_eq!(gocp_lines(&out.stderr), Vec::<String>::new());
}

/// The server dies while a cold build is storing outputs: the build still
/// succeeds, gocp says so in one line at most, and what was built stays usable
/// locally with the server still down.
pub fn down_mid_build(server: &mut dyn RemoteServer) {
    require_go();
    let tmp = tempfile::tempdir().unwrap();
    let backend = server.backend();
    let machine = Machine::new(tmp.path());
    let src = tmp.path().join("src");
    write_module(&src);

    // A build long enough to be cut: net/http and its dependencies, from scratch.
    let log = tmp.path().join("go-stderr");
    let mut child = machine
        .go(&backend, &src, &["build", "-trimpath", "-o", "/dev/null", "net/http"])
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .expect("running go");
    let deadline = Instant::now() + Duration::from_secs(120);
    while machine.objects() < 20 {
        assert!(Instant::now() < deadline, "the build stored nothing in 120 s");
        assert!(child.try_wait().unwrap().is_none(), "the build ended before the server could be stopped");
        std::thread::sleep(Duration::from_millis(20));
    }
    server.stop();
    let status = wait_within(child, COMMAND_LIMIT, "go build with the server down", &log);
    let stderr = fs::read(&log).unwrap();
    assert!(status.success(), "the build failed with the server down:\n{}", text(&stderr));
    let lines = gocp_lines(&stderr);
    assert!(lines.len() <= 1, "at most one line from gocp: {lines:?}");

    // The local tier still has everything: a new GOCACHE, the server still down.
    fs::remove_dir_all(tmp.path().join("gocache")).unwrap();
    fs::create_dir_all(tmp.path().join("gocache")).unwrap();
    let out = machine.run(&backend, &src, &["build", "-x", "-trimpath", "-o", "/dev/null", "net/http"]);
    assert_eq!(compile_steps(&text(&out.stderr)), Vec::<&str>::new(), "served from the local tier");
}

/// Credentials the server refuses: the build succeeds, and gocp says once,
/// in a line naming credentials, what is wrong.
pub fn bad_credentials(server: &dyn RemoteServer) {
    require_go();
    let tmp = tempfile::tempdir().unwrap();
    let machine = Machine::new(tmp.path());
    let src = tmp.path().join("src");
    write_module(&src);
    let out = machine.run(&server.backend_with_bad_credentials(), &src, &["build", "./..."]);
    let lines = gocp_lines(&out.stderr);
    assert_eq!(lines.len(), 1, "one line from gocp: {lines:?}");
    assert!(lines[0].contains("credentials"), "the line says credentials were refused: {}", lines[0]);
    let stats = machine.stats();
    assert!(count(&stats, "puts") > 0 && count(&stats, "put_failures") == 0, "outputs kept locally: {stats}");
}

/// `gocp-host plugin-test` against the server: the contract's checks pass.
pub fn conformance(server: &dyn RemoteServer) {
    let tmp = tempfile::tempdir().unwrap();
    let backend = server.backend();
    let mut cmd = Command::new(BIN);
    cmd.arg("plugin-test").args(&backend.args).arg("--dir").arg(tmp.path()).stdin(Stdio::null());
    for (k, v) in &backend.env {
        cmd.env(k, v);
    }
    let out = cmd.output_within(COMMAND_LIMIT);
    assert!(out.status.success(), "plugin-test failed:\n{}\n{}", text(&out.stdout), text(&out.stderr));
}

/// The server stops answering for a whole build (`freeze` stops it, e.g.
/// with SIGSTOP, so connections are accepted but never served): the build
/// succeeds in well under the time a request per action would cost, with
/// one gocp line that contains `says`.
pub fn hung_server(backend: &Backend, freeze: impl FnOnce(), thaw: impl FnOnce(), says: &str) {
    require_go();
    let tmp = tempfile::tempdir().unwrap();
    let machine = Machine::new(tmp.path());
    let src = tmp.path().join("src");
    write_module(&src);
    freeze();
    // The bound is what a request per action would cost, and more: a build
    // that gets there has hung.
    let out = machine.go(backend, &src, &["build", "./..."]).output_within(Duration::from_secs(90));
    thaw();
    assert!(out.status.success(), "the build failed with the server hung:\n{}", text(&out.stderr));
    let lines = gocp_lines(&out.stderr);
    assert_eq!(lines.len(), 1, "one line from gocp: {lines:?}");
    assert!(lines[0].contains(says), "the line says the server did not answer ({says:?}): {}", lines[0]);
}

/// The server answers entries, but every body stalls after its first KiB (a
/// proxy in front of it holds the rest back, the connection open): each get
/// is one failure however far it got, so the plugin is paused after a few
/// instead of costing a timeout on every request, and the size a body claims
/// buys no time of its own.
pub fn stalled_bodies(server: &dyn RemoteServer) {
    let tmp = tempfile::tempdir().unwrap();
    let backend = server.backend();
    let env: Vec<(&str, &str)> = backend.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let start = |state: &Path, backend: &Backend, extra: &[&str]| {
        let mut args: Vec<&str> = vec!["--dir", state.to_str().unwrap()];
        args.extend(backend.args.iter().map(String::as_str));
        args.extend(extra);
        Session::start_env(&args, &env).0
    };
    let action = |i: i64| sha256(format!("stalled action {i}").as_bytes());
    let gets = 20;
    let mut a = start(&tmp.path().join("a"), &backend, &[]);
    for i in 1..=gets {
        // Bytes that do not compress: what reaches the proxy is the body's size.
        let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ i as u64;
        let body: Vec<u8> = (0..64 * 1024u32)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        a.send_put(i, &action(i), &body);
        assert!(a.recv()["DiskPath"].is_string());
    }
    a.send_close(gets + 1);
    a.recv();
    let (status, _, stderr) = a.finish();
    assert!(status.success() && gocp_lines(stderr.as_bytes()).is_empty(), "{stderr}");

    let proxy = super::stall::StallingProxy::start(server.port(), 4096);
    let stats = tmp.path().join("b-stats.json");
    let via = backend.via(server.port(), proxy.port);
    let mut b =
        start(&tmp.path().join("b"), &via, &["--plugin-timeout", "1s", "--stats-json", stats.to_str().unwrap()]);
    for i in 1..=gets {
        b.send_get(i, &action(i));
        assert_eq!(b.recv()["Miss"], serde_json::json!(true), "a stalled body is never served");
    }
    b.send_close(gets + 1);
    b.recv();
    let (status, _, stderr) = b.finish();
    assert!(status.success(), "{stderr}");
    assert!(gocp_lines(stderr.as_bytes()).len() <= 1, "{stderr}");
    let st: Value = serde_json::from_slice(&fs::read(&stats).unwrap()).unwrap();
    assert!(count(&st, "breaker_trips") >= 1, "the stalls paused the plugin: {st}");
    assert!(count(&st, "skipped_while_paused") >= 1, "{st}");
}

impl Backend {
    /// The same backend with more flags for gocp-host.
    pub fn with(&self, extra: &[&str]) -> Backend {
        let mut b = self.clone();
        b.args.extend(extra.iter().map(|a| a.to_string()));
        b
    }
}

/// Makes a signing key pair with `gocp-host keygen` in `dir`; the paths of
/// the private and the public key.
pub fn keygen(dir: &Path) -> (PathBuf, PathBuf) {
    let out = Command::new(BIN).args(["keygen", "--out"]).arg(dir).output_within(COMMAND_LIMIT);
    assert!(out.status.success(), "{}", text(&out.stderr));
    (dir.join("signing.key"), dir.join("signing.pub"))
}

/// Pull requests build read-only: a whole build and its tests leave nothing
/// on the server (counted there). A trusted build signs what it writes, and a
/// second read-only machine that trusts its key then compiles nothing, its
/// tests cached, still writing nothing.
pub fn read_only_and_signed(server: &dyn RemoteServer) {
    let tmp = tempfile::tempdir().unwrap();
    let (private, public) = keygen(&tmp.path().join("keys"));
    let backend = server.backend();
    let read_only = backend.with(&["--read-only", "--trust-key", public.to_str().unwrap()]);
    let pr = Machine::new(&tmp.path().join("pr"));
    let src = tmp.path().join("src");
    write_module(&src);
    pr.run(&read_only, &src, &["build", "-trimpath", "./..."]);
    pr.run(&read_only, &src, &["test", "-trimpath", "./..."]);
    assert_eq!(server.stored(), 0, "a read-only build wrote to the server");
    assert!(count(&pr.stats(), "local_only_puts") > 0, "its outputs stayed local: {}", pr.stats());

    let trusted = Machine::new(&tmp.path().join("trusted"));
    let signing = backend.with(&["--sign-key", private.to_str().unwrap()]);
    trusted.run(&signing, &src, &["build", "-trimpath", "./..."]);
    trusted.run(&signing, &src, &["test", "-trimpath", "./..."]);
    let stored = server.stored();
    assert!(stored > 0, "the trusted build wrote its outputs");

    let second = Machine::new(&tmp.path().join("second"));
    let src_b = tmp.path().join("second/checkout/src");
    write_module(&src_b);
    let out = second.run(&read_only, &src_b, &["build", "-x", "-trimpath", "./..."]);
    assert_eq!(compile_steps(&text(&out.stderr)), Vec::<&str>::new(), "compiled from the signed entries");
    let out = second.run(&read_only, &src_b, &["test", "-trimpath", "./..."]);
    assert!(text(&out.stdout).lines().filter(|l| l.starts_with("ok ")).all(|l| l.ends_with("(cached)")));
    assert_eq!(gocp_lines(&out.stderr), Vec::<String>::new());
    assert_eq!(count(&second.stats(), "untrusted_entries"), 0);
    assert_eq!(server.stored(), stored, "the read-only machine wrote nothing");
}

/// Runs gocp-host with `--plugin plugin` and `args` on an empty stdin, with
/// only `env` among the AWS variables set, expecting it to refuse to start
/// (exit 2, a configuration mistake); returns its stderr.
pub fn fails_to_start(plugin: &str, args: &[&str], env: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(["--dir", dir.path().to_str().unwrap(), "--plugin", plugin]).args(args);
    cmd.env_remove("AWS_ACCESS_KEY_ID").env_remove("AWS_SECRET_ACCESS_KEY").env_remove("AWS_SESSION_TOKEN");
    cmd.envs(env.iter().copied()).stdin(Stdio::null());
    let out = cmd.output_within(COMMAND_LIMIT);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    stderr
}
