//! The server processes the benchmark runs: the cache servers of the remote
//! part (redis-server, versitygw, bazel-remote, gocached) and toxiproxy's
//! server, each on a free port of 127.0.0.1 with its data in a directory it is
//! given, and finding their executables (`$GOCP_TEST_TOOLS/bin` first, as the
//! tests do, then PATH).
//!
//! A [`Server`] kills its process when dropped, so a failing benchmark leaves
//! none behind; every wait for one to listen is bounded. This module never
//! listens anywhere but 127.0.0.1, never touches anything outside the
//! directories it is given, and never decides what a server is measured for.

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// versitygw's credentials and its one bucket (any values do: the server is
/// the benchmark's own).
pub const S3_ACCESS_KEY: &str = "gocp-bench-key";
pub const S3_SECRET_KEY: &str = "gocp-bench-secret-5e4d3c2b";
pub const S3_BUCKET: &str = "gocp-bench";

/// A server process, killed when dropped.
pub struct Server {
    name: String,
    child: Option<Child>,
    pub port: u16,
    /// Its stdout and stderr, shown when it fails to start.
    log: PathBuf,
}

impl Server {
    /// Starts `cmd` (output to `log`) and waits up to 30 s for
    /// 127.0.0.1:`port` to accept a connection.
    pub fn start(name: &str, mut cmd: Command, port: u16, log: &Path) -> Result<Server> {
        let out = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let mut server = Server { name: name.to_string(), child: Some(child), port, log: log.to_path_buf() };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            let exited = server.child.as_mut().map(|c| c.try_wait()).transpose()?.flatten();
            if exited.is_some() || Instant::now() > deadline {
                let log = fs::read_to_string(&server.log).unwrap_or_default();
                let how = exited.map_or("within 30 s".to_string(), |s| format!("({s})"));
                bail!("{name} did not listen on 127.0.0.1:{port} {how}:\n{}", crate::bounded::tail(&log, 20));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(server)
    }

    /// Kills the server: from then on its port refuses connections.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The directory `.ci/tools` installs into.
pub fn tools_dir() -> Result<PathBuf> {
    Ok(match std::env::var_os("GOCP_TEST_TOOLS") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?).join(".cache/gocp-test-tools"),
    })
}

/// An executable from `$GOCP_TEST_TOOLS/bin` (see .ci/tools), else from
/// PATH; the error names the script that installs it.
pub fn tool(name: &str, script: &str) -> Result<PathBuf> {
    let mut dirs = vec![tools_dir()?.join("bin")];
    dirs.extend(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()));
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .with_context(|| format!("{name} not found: run `bash .ci/tools/{script}.sh` first"))
}

/// redis-server 7 (`.ci/tools/redis.sh`), no persistence.
pub fn redis(dir: &Path) -> Result<Server> {
    fs::create_dir_all(dir)?;
    let port = free_port()?;
    let mut cmd = Command::new(tool("redis-server", "redis")?);
    cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args(["--daemonize", "no"])
        .arg("--dir")
        .arg(dir);
    let server = Server::start("redis-server", cmd, port, &dir.join("redis.log"))?;
    // Accepting connections comes before loading is done: wait for an answer.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !redis_answers(port) {
        if Instant::now() > deadline {
            bail!("redis-server on 127.0.0.1:{port} did not answer PING within 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(server)
}

fn redis_answers(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut buf = [0u8; 16];
    s.write_all(b"PING\r\n").is_ok() && matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
}

/// versitygw (`.ci/tools/versitygw.sh`) on its posix backend, with one
/// empty bucket, [`S3_BUCKET`], keeping connections open as S3 does (by
/// default it closes each after one response, which makes every helper pay a
/// connection per request: 3,463 for gocp's cold `go build std`).
pub fn versitygw(dir: &Path) -> Result<Server> {
    let root = dir.join("root");
    fs::create_dir_all(root.join(S3_BUCKET))?;
    let port = free_port()?;
    let mut cmd = Command::new(tool("versitygw", "versitygw")?);
    cmd.args([
        "--access",
        S3_ACCESS_KEY,
        "--secret",
        S3_SECRET_KEY,
        "--port",
        &format!("127.0.0.1:{port}"),
        "--quiet",
        "--keep-alive",
    ])
    .arg("posix")
    .arg(&root);
    Server::start("versitygw", cmd, port, &dir.join("versitygw.log"))
}

/// bazel-remote on its disk cache, HTTP only, with ActionResult validation
/// off (gocp's entries and other helpers' are not Bazel ActionResults).
pub fn bazel_remote(bin: &Path, dir: &Path) -> Result<Server> {
    let data = dir.join("data");
    fs::create_dir_all(&data)?;
    let port = free_port()?;
    let mut cmd = Command::new(bin);
    cmd.arg("--dir")
        .arg(&data)
        .args(["--max_size", "10", "--http_address", &format!("127.0.0.1:{port}"), "--grpc_address", "none"])
        .args(["--disable_http_ac_validation", "--access_log_level", "none"]);
    Server::start("bazel-remote", cmd, port, &dir.join("bazel-remote.log"))
}

/// gocached (bradfitz/go-tool-cache), no authentication.
pub fn gocached(bin: &Path, dir: &Path) -> Result<Server> {
    let data = dir.join("data");
    fs::create_dir_all(&data)?;
    let port = free_port()?;
    let mut cmd = Command::new(bin);
    cmd.arg("-cache-dir").arg(&data).args(["-listen", &format!("127.0.0.1:{port}")]);
    Server::start("gocached", cmd, port, &dir.join("gocached.log"))
}

/// toxiproxy's server (`.ci/tools/toxiproxy.sh`), its API on a free port.
pub fn toxiproxy(dir: &Path) -> Result<Server> {
    fs::create_dir_all(dir)?;
    let port = free_port()?;
    let mut cmd = Command::new(tool("toxiproxy-server", "toxiproxy")?);
    // It logs every connection at the info level.
    cmd.args(["-host", "127.0.0.1", "-port", &port.to_string()]).env("LOG_LEVEL", "warn");
    Server::start("toxiproxy-server", cmd, port, &dir.join("toxiproxy.log"))
}
