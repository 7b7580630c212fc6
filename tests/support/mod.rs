//! Shared by the integration tests: driving gocp-host as cmd/go does, running
//! the real go command, and building test plugins from source.
#![allow(dead_code)]

use std::io::{BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use crossbeam_channel::Receiver;
use serde_json::Value;
use sha2::{Digest, Sha256};

pub mod dns;
pub mod remote;
pub mod servers;
pub mod stall;

/// The gocp-host under test: the one cargo built for these tests, or the one
/// `GOCP_TEST_HOST` names (the static musl build, say).
pub const BIN: Bin = Bin;

pub struct Bin;

impl std::ops::Deref for Bin {
    type Target = str;

    fn deref(&self) -> &str {
        static PATH: OnceLock<String> = OnceLock::new();
        PATH.get_or_init(|| {
            std::env::var("GOCP_TEST_HOST")
                .ok()
                .filter(|p| !p.is_empty())
                .unwrap_or_else(|| env!("CARGO_BIN_EXE_gocp-host").to_string())
        })
    }
}

impl std::fmt::Display for Bin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self)
    }
}

impl AsRef<std::ffi::OsStr> for Bin {
    fn as_ref(&self) -> &std::ffi::OsStr {
        std::ffi::OsStr::new(&**self)
    }
}

/// How long any single response may take before a test gives up: generous,
/// because CI machines are shared, but bounded so a hang fails instead of
/// stalling the suite.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(120);

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

pub fn b64(bytes: &[u8]) -> String {
    BASE64.encode(bytes)
}

pub fn unb64(s: &str) -> Vec<u8> {
    BASE64.decode(s).expect("base64 from gocp-host")
}

/// Pseudo-random bytes, the same for the same seed however `buf` is cut:
/// bodies that do not compress, so that they travel and are stored as given.
pub fn noise(state: &mut u64, buf: &mut [u8]) {
    for b in buf.iter_mut() {
        *state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        *b = (*state >> 33) as u8;
    }
}

/// `len` bytes of [`noise`] from `seed`.
pub fn noise_body(seed: u64, len: usize) -> Vec<u8> {
    let mut body = vec![0u8; len];
    let mut state = seed;
    noise(&mut state, &mut body);
    body
}

/// A gocp-host process spoken to over its stdin and stdout.
pub struct Session {
    child: Child,
    stdin: Option<ChildStdin>,
    responses: Receiver<Result<Value, String>>,
    stdout_reader: Option<JoinHandle<()>>,
    stderr_reader: Option<JoinHandle<String>>,
}

impl Session {
    /// Starts gocp-host with `args` and reads its capabilities message.
    pub fn start(args: &[&str]) -> (Session, Value) {
        Session::start_env(args, &[])
    }

    pub fn start_env(args: &[&str], env: &[(&str, &str)]) -> (Session, Value) {
        let mut cmd = Command::new(BIN);
        cmd.args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Session::start_command(cmd)
    }

    /// Starts gocp-host as `cmd` says (a wrapper may run it, see `dns`).
    pub fn start_command(mut cmd: Command) -> (Session, Value) {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("starting gocp-host");
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = crossbeam_channel::unbounded();
        // Every byte on stdout must be JSON: a stray byte is reported as an error.
        let stdout_reader = std::thread::spawn(move || {
            let stream = serde_json::Deserializer::from_reader(BufReader::new(stdout)).into_iter::<Value>();
            for item in stream {
                let item = item.map_err(|e| format!("non-JSON on stdout: {e}"));
                let stop = item.is_err();
                if tx.send(item).is_err() || stop {
                    break;
                }
            }
        });
        let stderr_reader = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
        let stdin = child.stdin.take();
        let mut session = Session {
            child,
            stdin,
            responses: rx,
            stdout_reader: Some(stdout_reader),
            stderr_reader: Some(stderr_reader),
        };
        let caps = session.recv();
        (session, caps)
    }

    /// Hands stdin over, e.g. to a thread that writes while this one reads.
    pub fn take_stdin(&mut self) -> ChildStdin {
        self.stdin.take().expect("stdin still open")
    }

    pub fn stdin(&mut self) -> &mut ChildStdin {
        self.stdin.as_mut().expect("stdin still open")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Writes raw bytes, as a broken client might.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stdin().write_all(bytes).expect("writing to gocp-host");
    }

    pub fn send_get(&mut self, id: i64, action: &[u8; 32]) {
        let line = format!("{{\"ID\":{id},\"Command\":\"get\",\"ActionID\":\"{}\"}}\n\n", b64(action));
        self.send_raw(line.as_bytes());
    }

    /// Writes a put exactly as cmd/go does; returns the output id.
    pub fn send_put(&mut self, id: i64, action: &[u8; 32], body: &[u8]) -> [u8; 32] {
        let output = sha256(body);
        let mut msg = format!(
            "{{\"ID\":{id},\"Command\":\"put\",\"ActionID\":\"{}\",\"OutputID\":\"{}\"",
            b64(action),
            b64(&output)
        );
        if body.is_empty() {
            msg.push_str("}\n\n");
        } else {
            msg.push_str(&format!(",\"BodySize\":{}}}\n\n\"{}\"\n", body.len(), b64(body)));
        }
        self.send_raw(msg.as_bytes());
        output
    }

    /// Writes a put whose body is `size` bytes produced by `fill`, base64
    /// encoded on the fly so that even huge bodies never sit in memory here.
    pub fn send_put_streamed(
        &mut self,
        id: i64,
        action: &[u8; 32],
        output: &[u8; 32],
        size: u64,
        mut fill: impl FnMut(&mut [u8]),
    ) {
        let head = format!(
            "{{\"ID\":{id},\"Command\":\"put\",\"ActionID\":\"{}\",\"OutputID\":\"{}\",\"BodySize\":{size}}}\n\n\"",
            b64(action),
            b64(output)
        );
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(head.as_bytes()).unwrap();
        let mut chunk = vec![0u8; 3 << 20];
        let mut left = size;
        let mut encoded = String::with_capacity(4 << 20);
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            fill(&mut chunk[..n]);
            encoded.clear();
            BASE64.encode_string(&chunk[..n], &mut encoded);
            stdin.write_all(encoded.as_bytes()).unwrap();
            left -= n as u64;
        }
        stdin.write_all(b"\"\n").unwrap();
    }

    pub fn send_close(&mut self, id: i64) {
        self.send_raw(format!("{{\"ID\":{id},\"Command\":\"close\"}}\n\n").as_bytes());
    }

    /// The next response, failing the test on a timeout or non-JSON output.
    pub fn recv(&mut self) -> Value {
        match self.responses.recv_timeout(RESPONSE_TIMEOUT) {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => panic!("{e}"),
            Err(_) => {
                panic!("no response from gocp-host within {RESPONSE_TIMEOUT:?}; stderr: {}", self.kill_and_stderr())
            }
        }
    }

    /// Closes stdin (end of input) and waits for the process, with a bound.
    pub fn finish(mut self) -> (std::process::ExitStatus, Vec<Value>, String) {
        drop(self.stdin.take());
        let deadline = std::time::Instant::now() + RESPONSE_TIMEOUT;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if std::time::Instant::now() > deadline {
                panic!("gocp-host did not exit after end of input; stderr: {}", self.kill_and_stderr());
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        self.stdout_reader.take().unwrap().join().unwrap();
        let rest = self.responses.try_iter().map(|r| r.unwrap_or_else(|e| panic!("{e}"))).collect();
        let stderr = self.stderr_reader.take().unwrap().join().unwrap();
        (status, rest, stderr)
    }

    fn kill_and_stderr(&mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stderr_reader.take().map(|h| h.join().unwrap_or_default()).unwrap_or_default()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if self.stderr_reader.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// How long a command a test starts may run: a go build of the standard
/// library on a busy two-core machine takes minutes; beyond this it hangs.
pub const COMMAND_LIMIT: Duration = Duration::from_secs(600);

/// Running the commands a test starts with a bound: past it the command is
/// killed and the test fails with what it printed, so a hang fails the test
/// instead of stalling the suite.
pub trait Bounded {
    /// Runs to completion within `limit` (stdin empty unless set); its output.
    fn output_within(&mut self, limit: Duration) -> Output;
}

impl Bounded for Command {
    fn output_within(&mut self, limit: Duration) -> Output {
        // Through files, so a chatty command never blocks on a full pipe
        // while it is being waited for.
        let dir = tempfile::tempdir().unwrap();
        let (out, err) = (dir.path().join("stdout"), dir.path().join("stderr"));
        self.stdout(std::fs::File::create(&out).unwrap()).stderr(std::fs::File::create(&err).unwrap());
        let what = format!("{:?}", self.get_program());
        let child = self.spawn().unwrap_or_else(|e| panic!("starting {what}: {e}"));
        let status = wait_within(child, limit, &what, &err);
        Output { status, stdout: std::fs::read(&out).unwrap(), stderr: std::fs::read(&err).unwrap() }
    }
}

/// Waits for `child` at most `limit`, then kills it and fails the test,
/// showing what it wrote to the file `stderr`.
pub fn wait_within(mut child: Child, limit: Duration, what: &str, stderr: &Path) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let printed = std::fs::read_to_string(stderr).unwrap_or_default();
            panic!("{what} did not finish within {limit:?}; it printed:\n{printed}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs gocp-host with an empty stdin and returns its output: for start-up
/// checks and configuration errors.
pub fn run_host(args: &[&str]) -> Output {
    Command::new(BIN).args(args).stdin(Stdio::null()).output_within(COMMAND_LIMIT)
}

/// Runs the unit tests of a crate of the plugins workspace natively (its
/// crates build for wasm32-wasip2, so `cargo test` at the root does not
/// reach them), and checks that some ran and all passed.
pub fn plugin_crate_unit_tests(name: &str) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["test", "--lib", "-p", name])
        .current_dir(root.join("plugins"))
        .env("CARGO_TARGET_DIR", root.join("target").join("plugins-native"))
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .output_within(COMMAND_LIMIT);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    let passed: u32 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("test result: ok. ")?.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no test result in:\n{stdout}"));
    assert!(passed > 0, "{name} ran no tests:\n{stdout}");
}

/// Fails the test, with the reason, when there is no go command to test with.
pub fn require_go() {
    let version = Command::new("go").arg("version").stdin(Stdio::null()).output_within(COMMAND_LIMIT);
    assert!(version.status.success(), "the go command (>= 1.24) must be on PATH for these tests");
}

/// Where `.ci/tools/*.sh` install what the tests need.
pub fn tools_dir() -> PathBuf {
    match std::env::var_os("GOCP_TEST_TOOLS") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/gocp-test-tools"),
    }
}

/// An executable the tests need: from the tools directory, else from PATH.
/// Fails the test, naming the install script, when it is in neither.
pub fn tool(name: &str) -> PathBuf {
    let installed = tools_dir().join("bin").join(name);
    if installed.is_file() {
        return installed;
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join(name))
        .find(|p| p.is_file());
    on_path.unwrap_or_else(|| {
        panic!(
            "{name} is not installed: run `bash .ci/tools/<its script>.sh` (see .ci/tools/README.md) or `bash .ci/run`"
        )
    })
}

/// A free TCP port on 127.0.0.1 for a test server (free when asked; the
/// server binds it right after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Every file below `dir`, recursively.
/// Waits for the trim a session of `state` started in the background (see
/// host/src/local/trimmer.rs) to finish: it holds `objects/trim.lock` from
/// before the session ends. Fails the test after a minute.
pub fn wait_for_trim(state: &Path) {
    use rustix::fs::{FlockOperation, flock};
    let Ok(lock) = std::fs::File::open(state.join("objects/trim.lock")) else { return };
    let until = Instant::now() + Duration::from_secs(60);
    while flock(&lock, FlockOperation::NonBlockingLockShared).is_err() {
        assert!(Instant::now() < until, "the background trim of {} did not finish within a minute", state.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().unwrap().is_dir() {
            out.extend(files_under(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

/// A go command with a controlled environment: its own GOCACHE, no network,
/// no toolchain switching, and GOCACHEPROG when given.
pub fn go_command(dir: &Path, gocache: &Path, gocacheprog: Option<&str>, args: &[&str]) -> Command {
    let mut cmd = Command::new("go");
    cmd.args(args)
        .current_dir(dir)
        .env("GOCACHE", gocache)
        .env("GOFLAGS", "")
        .env("GOPROXY", "off")
        .env("GOTOOLCHAIN", "local")
        .env("GOTELEMETRY", "off")
        .env("GOWORK", "off")
        .env_remove("GOCACHEPROG")
        .stdin(Stdio::null());
    if let Some(prog) = gocacheprog {
        cmd.env("GOCACHEPROG", prog);
    }
    cmd
}

/// Runs [`go_command`] to completion, within [`COMMAND_LIMIT`].
pub fn go(dir: &Path, gocache: &Path, gocacheprog: Option<&str>, args: &[&str]) -> Output {
    go_command(dir, gocache, gocacheprog, args).output_within(COMMAND_LIMIT)
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Lines of `go build -x` output that run the compiler.
pub fn compile_steps(stderr: &str) -> Vec<&str> {
    stderr.lines().filter(|l| l.contains("/pkg/tool/") && l.contains("/compile ")).collect()
}

/// Writes a module with several packages, tests and a command.
pub fn write_module(dir: &Path) {
    let files: &[(&str, &str)] = &[
        ("go.mod", "module example.com/gocptest\n\ngo 1.22\n"),
        (
            "mathx/mathx.go",
            "package mathx\n\n// Sum adds the numbers.\nfunc Sum(xs ...int) int {\n\tt := 0\n\tfor _, x := range xs {\n\t\tt += x\n\t}\n\treturn t\n}\n",
        ),
        (
            "mathx/mathx_test.go",
            "package mathx\n\nimport \"testing\"\n\nfunc TestSum(t *testing.T) {\n\tif Sum(1, 2, 3) != 6 {\n\t\tt.Fatal(\"bad sum\")\n\t}\n}\n",
        ),
        (
            "textx/textx.go",
            "package textx\n\nimport (\n\t\"sort\"\n\t\"strings\"\n)\n\n// Words returns the sorted words of s.\nfunc Words(s string) []string {\n\tw := strings.Fields(s)\n\tsort.Strings(w)\n\treturn w\n}\n",
        ),
        (
            "textx/textx_test.go",
            "package textx_test\n\nimport (\n\t\"testing\"\n\n\t\"example.com/gocptest/textx\"\n)\n\nfunc TestWords(t *testing.T) {\n\tif got := textx.Words(\"b a\"); got[0] != \"a\" {\n\t\tt.Fatal(got)\n\t}\n}\n",
        ),
        (
            "internal/store/store.go",
            "package store\n\nimport (\n\t\"encoding/json\"\n\t\"sync\"\n)\n\n// KV is a tiny concurrent map.\ntype KV struct {\n\tmu sync.Mutex\n\tm  map[string]int\n}\n\nfunc (k *KV) Put(key string, v int) {\n\tk.mu.Lock()\n\tdefer k.mu.Unlock()\n\tif k.m == nil {\n\t\tk.m = map[string]int{}\n\t}\n\tk.m[key] = v\n}\n\nfunc (k *KV) JSON() string {\n\tk.mu.Lock()\n\tdefer k.mu.Unlock()\n\tb, _ := json.Marshal(k.m)\n\treturn string(b)\n}\n",
        ),
        (
            "internal/store/store_test.go",
            "package store\n\nimport \"testing\"\n\nfunc TestKV(t *testing.T) {\n\tvar k KV\n\tk.Put(\"a\", 1)\n\tif k.JSON() != `{\"a\":1}` {\n\t\tt.Fatal(k.JSON())\n\t}\n}\n",
        ),
        (
            "cmd/tool/main.go",
            "package main\n\nimport (\n\t\"fmt\"\n\t\"os\"\n\n\t\"example.com/gocptest/internal/store\"\n\t\"example.com/gocptest/mathx\"\n\t\"example.com/gocptest/textx\"\n)\n\nfunc main() {\n\tvar k store.KV\n\tfor i, w := range textx.Words(\"gamma alpha beta\") {\n\t\tk.Put(w, i)\n\t}\n\tfmt.Fprintln(os.Stdout, k.JSON(), mathx.Sum(1, 2))\n}\n",
        ),
    ];
    for (name, body) in files {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, body).unwrap();
    }
}

/// Builds a plugin crate of `tests/plugins` (test-only plugins) for
/// wasm32-wasip2 and returns the component's path. Built once per test run.
pub fn test_plugin(name: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<()>> = OnceLock::new();
    let _guard = BUILT.get_or_init(|| Mutex::new(())).lock().unwrap_or_else(|e| e.into_inner());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let target = root.join("target").join("test-plugins");
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--release", "--target", "wasm32-wasip2", "-p", name])
        .current_dir(root.join("tests").join("plugins"))
        .env("CARGO_TARGET_DIR", &target)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .output_within(COMMAND_LIMIT);
    assert!(out.status.success(), "building test plugin {name}:\n{}", text(&out.stderr));
    target.join("wasm32-wasip2").join("release").join(format!("{}.wasm", name.replace('-', "_")))
}
