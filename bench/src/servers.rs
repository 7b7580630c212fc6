//! The server processes the benchmark runs: the cache servers of the remote
//! part (redis-server, versitygw, bazel-remote, gocached, fake-gcs-server,
//! Azurite) and toxiproxy's server, each on a free port of 127.0.0.1 with its
//! data in a directory it is given and, for the object stores, the bucket or
//! container its clients expect already made; and finding their executables
//! (`$GOCP_TEST_TOOLS/bin` first, as the tests do, then PATH).
//!
//! A [`Server`] kills its process when dropped, so a failing benchmark leaves
//! none behind; every wait for one to listen is bounded. This module never
//! listens anywhere but 127.0.0.1, never touches anything outside the
//! directories it is given, and never decides what a server is measured for.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use sha2::{Digest, Sha256};

/// versitygw's credentials and its one bucket (any values do: the server is
/// the benchmark's own).
pub const S3_ACCESS_KEY: &str = "gocp-bench-key";
pub const S3_SECRET_KEY: &str = "gocp-bench-secret-5e4d3c2b";
pub const S3_BUCKET: &str = "gocp-bench";
/// fake-gcs-server's one bucket. The emulator checks no token, but the gcs
/// plugin sends one, as it would to Google: this made-up one.
pub const GCS_BUCKET: &str = "gocp-bench";
pub const GCS_TOKEN: &str = "ya29.gocp-bench-token";
/// Azurite's built-in development account and its published key (the same
/// in every Azurite), and the one container made in it.
pub const AZURE_ACCOUNT: &str = "devstoreaccount1";
pub const AZURE_KEY: &str = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
pub const AZURE_CONTAINER: &str = "gocp-bench";
/// The Blob service REST version of the request that makes the container.
const AZURE_API_VERSION: &str = "2021-12-02";

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

/// fake-gcs-server (`.ci/tools/fake-gcs-server.sh`) on its filesystem
/// backend, with one empty bucket, [`GCS_BUCKET`]. Its clients reach it
/// through 127.0.0.1:`public_port` (the proxy in front of it): it puts that
/// address into the session URLs of resumable uploads (the gcs plugin's way
/// for bodies above 16 MiB), which must lead back through the proxy, and
/// which the plugin may only reach because that address is granted.
pub fn fake_gcs(dir: &Path, public_port: u16) -> Result<Server> {
    let root = dir.join("root");
    fs::create_dir_all(&root)?;
    let port = free_port()?;
    let public = format!("127.0.0.1:{public_port}");
    let mut cmd = Command::new(tool("fake-gcs-server", "fake-gcs-server")?);
    cmd.args(["-scheme", "http", "-host", "127.0.0.1", "-port", &port.to_string(), "-backend", "filesystem"])
        .arg("-filesystem-root")
        .arg(&root)
        .args(["-external-url", &format!("http://{public}"), "-public-host", &public])
        .args(["-log-level", "warn"])
        // A seed directory from the environment would fill the bucket.
        .env_remove("FAKE_GCS_DATA");
    let server = Server::start("fake-gcs-server", cmd, port, &dir.join("fake-gcs-server.log"))?;
    let body = format!("{{\"name\":\"{GCS_BUCKET}\"}}");
    let headers = [("Content-Type", "application/json".to_string())];
    let (status, answer) = http(port, "POST", "/storage/v1/b", &headers, &body)
        .with_context(|| format!("creating bucket {GCS_BUCKET} in fake-gcs-server"))?;
    ensure!(status == 200, "fake-gcs-server answered {status} to creating bucket {GCS_BUCKET}: {}", answer.trim());
    Ok(server)
}

/// Azurite's blob service (`.ci/tools/azurite.sh`), quiet (no access log,
/// no telemetry), with its data under `dir` and one empty container,
/// [`AZURE_CONTAINER`], in its development account.
pub fn azurite(dir: &Path) -> Result<Server> {
    let data = dir.join("data");
    fs::create_dir_all(&data)?;
    let port = free_port()?;
    let mut cmd = Command::new(tool("azurite-blob", "azurite")?);
    cmd.args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string(), "--silent", "--disableTelemetry"])
        .arg("--location")
        .arg(&data)
        // Accounts from the environment would replace the development one.
        .env_remove("AZURITE_ACCOUNTS");
    let server = Server::start("azurite", cmd, port, &dir.join("azurite.log"))?;
    let (status, answer) =
        azure_create_container(port).with_context(|| format!("creating container {AZURE_CONTAINER} in Azurite"))?;
    ensure!(status == 201, "Azurite answered {status} to creating container {AZURE_CONTAINER}: {}", answer.trim());
    Ok(server)
}

/// Create Container, signed with the account key (Shared Key; Azurite, like
/// Azure, refuses an unsigned one). The emulator's URLs name the account in
/// the path, so the signed resource names it twice.
fn azure_create_container(port: u16) -> Result<(u16, String)> {
    let path = format!("/{AZURE_ACCOUNT}/{AZURE_CONTAINER}");
    let date = http_date(SystemTime::now())?;
    // The verb, then eleven standard headers, all empty (Content-Length 0 is
    // signed as empty), then the x-ms- headers in order, then the resource
    // and its query parameters.
    let to_sign = format!(
        "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{AZURE_API_VERSION}\n/{AZURE_ACCOUNT}{path}\nrestype:container"
    );
    let key = BASE64.decode(AZURE_KEY).context("Azurite's key")?;
    let signature = BASE64.encode(hmac_sha256(&key, to_sign.as_bytes()));
    let headers = [
        ("x-ms-date", date),
        ("x-ms-version", AZURE_API_VERSION.to_string()),
        ("Authorization", format!("SharedKey {AZURE_ACCOUNT}:{signature}")),
    ];
    http(port, "PUT", &format!("{path}?restype=container"), &headers, "")
}

/// One request to 127.0.0.1:`port`, over HTTP/1.0 so that the answer ends
/// with the connection and is never chunked, bounded by socket timeouts; the
/// answer's status and body.
fn http(port: u16, method: &str, target: &str, headers: &[(&str, String)], body: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).with_context(|| format!("connecting to 127.0.0.1:{port}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.set_write_timeout(Some(Duration::from_secs(30)))?;
    let mut request = format!(
        "{method} {target} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: gocp-bench\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    s.write_all(request.as_bytes())?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).with_context(|| format!("reading the answer to {method} {target}"))?;
    let answer = String::from_utf8_lossy(&answer);
    let (head, rest) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((status, rest.to_string()))
}

/// HMAC-SHA256 (RFC 2104, 64-byte blocks), for the one Shared Key signature.
fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut block = [0u8; 64];
    if key.len() > block.len() {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block.iter().map(|b| b ^ byte).collect::<Vec<u8>>();
    let inner = Sha256::new().chain_update(pad(0x36)).chain_update(message).finalize();
    Sha256::new().chain_update(pad(0x5c)).chain_update(inner).finalize().into()
}

/// `t` as an HTTP date (RFC 7231's IMF-fixdate), which x-ms-date must be.
fn http_date(t: SystemTime) -> Result<String> {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let secs = t.duration_since(UNIX_EPOCH).context("the clock is before 1970")?.as_secs();
    let (mut days, time) = (secs / 86_400, secs % 86_400);
    // 1970-01-01 was a Thursday.
    let weekday = DAYS[(days % 7) as usize];
    let leap = |y: u64| (y.is_multiple_of(4) && !y.is_multiple_of(100)) || y.is_multiple_of(400);
    let mut year = 1970;
    while days >= if leap(year) { 366 } else { 365 } {
        days -= if leap(year) { 366 } else { 365 };
        year += 1;
    }
    let mut month = 0;
    loop {
        let length = match month {
            1 if leap(year) => 29,
            1 => 28,
            3 | 5 | 8 | 10 => 30,
            _ => 31,
        };
        if days < length {
            break;
        }
        days -= length;
        month += 1;
    }
    Ok(format!(
        "{weekday}, {:02} {} {year} {:02}:{:02}:{:02} GMT",
        days + 1,
        MONTHS[month],
        time / 3600,
        time % 3600 / 60,
        time % 60
    ))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231() {
        // Test cases 2 and 6 (a key longer than a block).
        let hex = |b: &[u8]| b.iter().map(|b| format!("{b:02x}")).collect::<String>();
        assert_eq!(
            hex(&hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_eq!(
            hex(&hmac_sha256(&[0xaa; 131], b"Test Using Larger Than Block-Size Key - Hash Key First")),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn http_dates() {
        let at = |secs: u64| http_date(UNIX_EPOCH + Duration::from_secs(secs)).unwrap();
        assert_eq!(at(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(at(784_111_777), "Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(at(951_782_400), "Tue, 29 Feb 2000 00:00:00 GMT");
        assert_eq!(at(1_709_251_199), "Thu, 29 Feb 2024 23:59:59 GMT");
        assert_eq!(at(4_107_542_400), "Mon, 01 Mar 2100 00:00:00 GMT");
    }
}
