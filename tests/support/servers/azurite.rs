//! Azurite, Microsoft's Azure Storage emulator (its blob service), on
//! 127.0.0.1 for the azure plugin's tests (installed by
//! `.ci/tools/azurite.sh`), with an account of its own and one container,
//! made with a Shared Key request signed here. The process is killed when
//! the value is dropped; it must never be shared between tests.
//!
//! It never sends telemetry (`--disableTelemetry`) and keeps everything in
//! its own temporary directory.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use sha2::{Digest, Sha256};

use super::Process;
use crate::support::remote::{Backend, RemoteServer};
use crate::support::{free_port, tool};

pub const ACCOUNT: &str = "gocptest";
pub const CONTAINER: &str = "go-cache";
/// The account's key, as Azure shows keys: base64.
const KEY: &str = "Z29jcC10ZXN0LWFjY291bnQta2V5LW5vdC1hLXJlYWwtb25lLTEyMzQ1Njc4OTA=";
/// A key of the right form that is not the account's.
const WRONG_KEY: &str = "d3Jvbmcta2V5LWZvci10aGUtZ29jcHRlc3QtYWNjb3VudC0wMDAwMDAwMDAwMDA=";
/// The variables the tests grant to the plugin.
pub const KEY_VAR: &str = "GOCP_TEST_AZURE_KEY";
pub const SAS_VAR: &str = "GOCP_TEST_AZURE_SAS";
const API_VERSION: &str = "2021-12-02";

/// How the plugin authenticates in [`RemoteServer::backend`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Credentials {
    SharedKey,
    Sas,
}

pub struct Azurite {
    process: Process,
    dir: tempfile::TempDir,
    pub port: u16,
    credentials: Credentials,
}

impl Azurite {
    /// Azurite with the container, reached with the account key.
    pub fn start() -> Azurite {
        Azurite::start_with(Credentials::SharedKey, false)
    }

    /// `public`: the container lets anyone read its blobs.
    pub fn start_with(credentials: Credentials, public: bool) -> Azurite {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut command = Command::new(tool("azurite-blob"));
        command
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string(), "--disableTelemetry", "--location"])
            .arg(dir.path().join("data"))
            .env("AZURITE_ACCOUNTS", format!("{ACCOUNT}:{KEY}"));
        let process = Process::start("azurite", command, port, &dir.path().join("server.log"));
        let server = Azurite { process, dir, port, credentials };
        let mut headers = vec![];
        if public {
            headers.push(("x-ms-blob-public-access", "blob".to_string()));
        }
        let (status, body) = server.signed("PUT", &format!("/{ACCOUNT}/{CONTAINER}"), "restype=container", headers);
        assert_eq!(status, 201, "creating the container: {body}");
        server
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/{ACCOUNT}", self.port)
    }

    /// What Azurite logged: a line per request served, with its method and URL.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// The plugin's flags: the account and container, `credentials` as
    /// config pairs, and the grant for this server.
    fn backend_for(&self, credentials: &[&str], env: Vec<(String, String)>) -> Backend {
        let mut args: Vec<String> = vec!["--plugin".into(), "azure".into()];
        let config =
            [format!("account={ACCOUNT}"), format!("container={CONTAINER}"), format!("endpoint={}", self.endpoint())];
        for pair in config.iter().map(String::as_str).chain(credentials.iter().copied()) {
            args.extend(["--config".into(), pair.to_string()]);
        }
        args.extend(["--allow-net".into(), format!("127.0.0.1:{}", self.port)]);
        for (var, _) in &env {
            args.extend(["--allow-env".into(), var.clone()]);
        }
        Backend { args, env }
    }

    fn backend_signed_with(&self, key: &str) -> Backend {
        match self.credentials {
            Credentials::SharedKey => {
                self.backend_for(&[&format!("key-env={KEY_VAR}")], vec![(KEY_VAR.into(), key.into())])
            }
            Credentials::Sas => {
                self.backend_for(&[&format!("sas-env={SAS_VAR}")], vec![(SAS_VAR.into(), container_sas(key, "rcw"))])
            }
        }
    }

    /// The plugin's flags for reading without credentials.
    pub fn backend_without_credentials(&self) -> Backend {
        self.backend_for(&["credentials=none"], Vec::new())
    }

    /// A request signed with the account key (Shared Key); its status and
    /// body. HTTP/1.0, so the answer comes whole, without chunks.
    fn signed(&self, method: &str, path: &str, query: &str, mut headers: Vec<(&str, String)>) -> (u16, String) {
        headers.push(("x-ms-date", http_date(SystemTime::now())));
        headers.push(("x-ms-version", API_VERSION.into()));
        headers.sort();
        let mut to_sign = format!("{method}\n\n\n\n\n\n\n\n\n\n\n\n");
        for (name, value) in &headers {
            to_sign.push_str(&format!("{name}:{value}\n"));
        }
        to_sign.push_str(&format!("/{ACCOUNT}{path}"));
        let mut params: Vec<&str> = query.split('&').filter(|p| !p.is_empty()).collect();
        params.sort();
        for param in params {
            to_sign.push_str(&format!("\n{}", param.replacen('=', ":", 1)));
        }
        let signature = BASE64.encode(hmac_sha256(&BASE64.decode(KEY).unwrap(), to_sign.as_bytes()));
        let mut request =
            format!("{method} {path}?{query} HTTP/1.0\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\n", self.port);
        for (name, value) in &headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str(&format!("Authorization: SharedKey {ACCOUNT}:{signature}\r\n\r\n"));
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        stream.write_all(request.as_bytes()).unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        let status = answer.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let body = answer.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        (status, body)
    }
}

impl RemoteServer for Azurite {
    fn port(&self) -> u16 {
        self.port
    }

    /// Blobs in the container, as the service lists them.
    fn stored(&self) -> usize {
        let (status, body) = self.signed(
            "GET",
            &format!("/{ACCOUNT}/{CONTAINER}"),
            "comp=list&maxresults=5000&restype=container",
            vec![],
        );
        assert_eq!(status, 200, "listing the container: {body}");
        let more = body.split("<NextMarker>").nth(1).is_some_and(|rest| !rest.starts_with('<'));
        assert!(!more, "more blobs than one page lists");
        body.matches("<Blob>").count()
    }

    fn backend(&self) -> Backend {
        self.backend_signed_with(KEY)
    }

    fn backend_with_bad_credentials(&self) -> Backend {
        self.backend_signed_with(WRONG_KEY)
    }

    fn stop(&mut self) {
        self.process.stop();
    }
}

/// A service SAS for the whole container with `permissions`, signed with
/// `key`, valid until 2099: the query string Azure's tools give out.
pub fn container_sas(key: &str, permissions: &str) -> String {
    let expiry = "2099-01-01T00:00:00Z";
    // Permissions, start, expiry, resource, identifier, IP, protocol,
    // version, resource type, snapshot, encryption scope, then the five
    // response headers a SAS may override: empty lines where unused.
    let to_sign =
        format!("{permissions}\n\n{expiry}\n/blob/{ACCOUNT}/{CONTAINER}\n\n\n\n{API_VERSION}\nc\n\n\n\n\n\n\n");
    let signature = BASE64.encode(hmac_sha256(&BASE64.decode(key).unwrap(), to_sign.as_bytes()));
    let encoded: String = url_encode(&signature);
    format!("sv={API_VERSION}&sr=c&sp={permissions}&se={}&sig={encoded}", url_encode(expiry))
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// HMAC-SHA256 (RFC 2104), from sha2, which the tests already have.
fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let inner = Sha256::new().chain_update(block.map(|b| b ^ 0x36)).chain_update(message).finalize();
    Sha256::new().chain_update(block.map(|b| b ^ 0x5c)).chain_update(inner).finalize().into()
}

/// An RFC 1123 date, as x-ms-date wants it.
fn http_date(t: SystemTime) -> String {
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let secs = t.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][days.rem_euclid(7) as usize];
    // Days to a civil date (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{weekday}, {day:02} {} {year} {:02}:{:02}:{:02} GMT",
        MONTHS[(month - 1) as usize],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
