//! Google Cloud Storage for the gcs plugin's tests: fake-gcs-server (the
//! emulator GCS client libraries are tested with, installed by
//! `.ci/tools/fake-gcs-server.sh`) behind a front of our own, since the
//! emulator issues no tokens and takes any:
//!
//! - a token endpoint on a port of its own, which checks a service
//!   account's JWT assertion as Google's does (claims, and the RS256
//!   signature against the account's public key, with the openssl command)
//!   and issues access tokens;
//! - in front of the emulator's API, a proxy that lets through only
//!   requests carrying a token it issued (or the fixed token the token-env
//!   tests use), answering others 401 with Google's error document, and
//!   keeps a log of the requests.
//!
//! Everything listens on 127.0.0.1 and lives in one temporary directory; the
//! emulator is killed and the front closed when the value is dropped. It
//! must never be shared between tests.

use std::collections::HashSet;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

use super::Process;
use crate::support::remote::{Backend, RemoteServer};
use crate::support::{Bounded, free_port, text, tool};

pub const BUCKET: &str = "gocp-cache";
const EMAIL: &str = "gocp-cache@gocp-test.iam.gserviceaccount.com";
/// The access token the token-env tests hand the plugin.
const STATIC_TOKEN: &str = "ya29.gocp-test-static-token";
/// The variables the tests grant to the plugin.
pub const KEY_VAR: &str = "GOCP_TEST_GCS_KEY";
pub const TOKEN_VAR: &str = "GOCP_TEST_GCS_TOKEN";
/// How often a blocked thread of the front looks whether it should stop.
const POLL: Duration = Duration::from_millis(50);

/// How the plugin authenticates in [`RemoteServer::backend`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Credentials {
    /// A service-account key, its JSON in [`KEY_VAR`].
    Key,
    /// The same key as a file in a granted directory, its path in [`KEY_VAR`].
    KeyFile,
    /// An access token in [`TOKEN_VAR`].
    Token,
}

/// The account's key pair and a key that is not the account's, made once
/// per test process with openssl (PKCS#8 PEM, as Google's key files hold).
struct Keys {
    private: String,
    public: String,
    wrong: String,
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl").args(args).current_dir(dir.path()).output_within(Duration::from_secs(60));
            assert!(out.status.success(), "openssl {args:?} (needed to make test keys): {}", text(&out.stderr));
        };
        for name in ["account.pem", "wrong.pem"] {
            openssl(&["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", name]);
        }
        openssl(&["pkey", "-in", "account.pem", "-pubout", "-out", "public.pem"]);
        let read = |name: &str| fs::read_to_string(dir.path().join(name)).unwrap();
        Keys { private: read("account.pem"), public: read("public.pem"), wrong: read("wrong.pem") }
    })
}

/// What the front knows and counts.
struct Front {
    stop: AtomicBool,
    /// Tokens the token endpoint issued.
    issued: Mutex<HashSet<String>>,
    /// Assertions it refused.
    refused: AtomicUsize,
    /// `METHOD path?query` of every API request, let through or not.
    requests: Mutex<Vec<String>>,
    /// Every connection, to close them all on stop.
    streams: Mutex<Vec<TcpStream>>,
    public_reads: bool,
    /// The account's public key, for openssl.
    public_key: PathBuf,
    /// The `aud` an assertion must name: the token endpoint's URL.
    token_url: String,
    dir: PathBuf,
}

pub struct FakeGcs {
    emulator: Process,
    front: Arc<Front>,
    threads: Vec<JoinHandle<()>>,
    dir: tempfile::TempDir,
    /// The API's port (the front), and the token endpoint's.
    pub port: u16,
    pub token_port: u16,
    credentials: Credentials,
}

impl FakeGcs {
    /// The emulator with [`BUCKET`], reached with the service-account key.
    pub fn start() -> FakeGcs {
        FakeGcs::start_with(Credentials::Key, false)
    }

    /// `public_reads`: GET requests without a token are let through too,
    /// as for a bucket that allUsers may read.
    pub fn start_with(credentials: Credentials, public_reads: bool) -> FakeGcs {
        let dir = tempfile::tempdir().unwrap();
        let (port, token_port, inner_port) = (free_port(), free_port(), free_port());
        fs::create_dir_all(dir.path().join("seed").join(BUCKET)).unwrap();
        let mut command = Command::new(tool("fake-gcs-server"));
        command
            .args(["-scheme", "http", "-host", "127.0.0.1", "-port", &inner_port.to_string(), "-backend", "filesystem"])
            .arg("-filesystem-root")
            .arg(dir.path().join("root"))
            .arg("-data")
            .arg(dir.path().join("seed"))
            // Upload sessions' URLs must lead back through the front.
            .args(["-external-url", &format!("http://127.0.0.1:{port}"), "-public-host", &format!("127.0.0.1:{port}")])
            .args(["-log-level", "warn"]);
        let emulator = Process::start("fake-gcs-server", command, inner_port, &dir.path().join("server.log"));
        let public_key = dir.path().join("public.pem");
        fs::write(&public_key, &keys().public).unwrap();
        let front = Arc::new(Front {
            stop: AtomicBool::new(false),
            issued: Mutex::new(HashSet::new()),
            refused: AtomicUsize::new(0),
            requests: Mutex::new(Vec::new()),
            streams: Mutex::new(Vec::new()),
            public_reads,
            public_key,
            token_url: format!("http://127.0.0.1:{token_port}/token"),
            dir: dir.path().to_path_buf(),
        });
        let threads = vec![
            listen(port, front.clone(), move |client, front| proxy(client, inner_port, front)),
            listen(token_port, front.clone(), token_endpoint),
        ];
        FakeGcs { emulator, front, threads, dir, port, token_port, credentials }
    }

    /// `METHOD path?query` of every request the API was sent, in order.
    pub fn requests(&self) -> Vec<String> {
        self.front.requests.lock().unwrap().clone()
    }

    /// How many tokens the token endpoint issued.
    pub fn tokens_issued(&self) -> usize {
        self.front.issued.lock().unwrap().len()
    }

    /// How many assertions the token endpoint refused.
    pub fn assertions_refused(&self) -> usize {
        self.front.refused.load(Ordering::SeqCst)
    }

    /// The plugin's flags with `credentials` config pairs and grants.
    fn backend_for(&self, credentials: &[String], grants: &[String], env: Vec<(String, String)>) -> Backend {
        let mut args: Vec<String> = vec!["--plugin".into(), "gcs".into()];
        let config = [format!("bucket={BUCKET}"), format!("endpoint=http://127.0.0.1:{}", self.port)];
        for pair in config.iter().chain(credentials) {
            args.extend(["--config".into(), pair.clone()]);
        }
        args.extend(["--allow-net".into(), format!("127.0.0.1:{}", self.port)]);
        args.extend(grants.iter().cloned());
        for (var, _) in &env {
            args.extend(["--allow-env".into(), var.clone()]);
        }
        Backend { args, env }
    }

    fn backend_with(&self, private_key: &str, token: &str) -> Backend {
        let key = json!({
            "type": "service_account",
            "project_id": "gocp-test",
            "private_key_id": "0123456789abcdef",
            "private_key": private_key,
            "client_email": EMAIL,
            "client_id": "100000000000000000001",
            "token_uri": self.front.token_url,
        })
        .to_string();
        let token_grant = ["--allow-net".to_string(), format!("127.0.0.1:{}", self.token_port)];
        match self.credentials {
            Credentials::Key => {
                self.backend_for(&[format!("key-env={KEY_VAR}")], &token_grant, vec![(KEY_VAR.into(), key)])
            }
            Credentials::KeyFile => {
                let keys = self.dir.path().join(format!("keys-{}", sha_hex(private_key)));
                fs::create_dir_all(&keys).unwrap();
                let file = keys.join("service-account.json");
                fs::write(&file, key).unwrap();
                let mut grants = token_grant.to_vec();
                grants.extend(["--allow-dir".into(), format!("{}:ro", keys.display())]);
                self.backend_for(
                    &[format!("key-env={KEY_VAR}")],
                    &grants,
                    vec![(KEY_VAR.into(), file.display().to_string())],
                )
            }
            Credentials::Token => {
                self.backend_for(&[format!("token-env={TOKEN_VAR}")], &[], vec![(TOKEN_VAR.into(), token.into())])
            }
        }
    }

    /// The plugin's flags for reading without credentials.
    pub fn backend_without_credentials(&self) -> Backend {
        self.backend_for(&["credentials=none".into()], &[], Vec::new())
    }
}

fn sha_hex(s: &str) -> String {
    crate::support::sha256(s.as_bytes())[..4].iter().map(|b| format!("{b:02x}")).collect()
}

impl RemoteServer for FakeGcs {
    fn port(&self) -> u16 {
        self.port
    }

    /// Objects in the bucket: the emulator keeps each as a file.
    fn stored(&self) -> usize {
        crate::support::files_under(&self.dir.path().join("root").join(BUCKET)).len()
    }

    fn backend(&self) -> Backend {
        self.backend_with(&keys().private, STATIC_TOKEN)
    }

    /// A key that is not the account's (the token endpoint refuses its
    /// assertions), or a token nobody issued (the API refuses it).
    fn backend_with_bad_credentials(&self) -> Backend {
        self.backend_with(&keys().wrong, "ya29.not-a-token-anyone-issued")
    }

    fn stop(&mut self) {
        self.emulator.stop();
        self.front.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        for s in self.front.streams.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for FakeGcs {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Accepts connections on 127.0.0.1:`port` until stopped, each served by
/// `serve` on a thread of its own; returns the accepting thread, which
/// drops the listener (so connecting is refused) when it stops.
fn listen(
    port: u16,
    front: Arc<Front>,
    serve: impl Fn(TcpStream, Arc<Front>) + Clone + Send + 'static,
) -> JoinHandle<()> {
    let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        while !front.stop.load(Ordering::SeqCst) {
            let Ok((stream, _)) = listener.accept() else {
                std::thread::sleep(POLL);
                continue;
            };
            stream.set_nonblocking(false).unwrap();
            front.streams.lock().unwrap().push(stream.try_clone().unwrap());
            let (front, serve) = (front.clone(), serve.clone());
            std::thread::spawn(move || serve(stream, front));
        }
    })
}

/// One request's head: its first line and its header fields (names in
/// lower case), and the bytes as they came.
struct Head {
    method: String,
    target: String,
    fields: Vec<(String, String)>,
    raw: Vec<u8>,
}

impl Head {
    fn field(&self, name: &str) -> Option<&str> {
        self.fields.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    fn content_length(&self) -> u64 {
        self.field("content-length").and_then(|v| v.parse().ok()).unwrap_or(0)
    }
}

/// The next request's head, `None` once the client is gone.
fn read_head(reader: &mut impl BufRead) -> Option<Head> {
    let mut raw = Vec::new();
    let mut lines = Vec::new();
    loop {
        let mut line = Vec::new();
        if reader.read_until(b'\n', &mut line).ok()? == 0 {
            return None;
        }
        raw.extend_from_slice(&line);
        let line = String::from_utf8_lossy(&line).trim_end().to_string();
        if line.is_empty() {
            break;
        }
        lines.push(line);
    }
    let mut first = lines.first()?.split(' ');
    let (method, target) = (first.next()?.to_string(), first.next()?.to_string());
    let fields = lines[1..]
        .iter()
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Some(Head { method, target, fields, raw })
}

fn respond(client: &mut TcpStream, status: &str, body: &Value) {
    let body = body.to_string();
    let answer =
        format!("HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    let _ = client.write_all(answer.as_bytes());
}

/// The API side: each request with an issued token (or a GET when reads are
/// public) goes to the emulator, body and all; any other is answered 401
/// here, its body read and dropped. The emulator's answers go back as they
/// come, on a thread of their own.
fn proxy(client: TcpStream, upstream_port: u16, front: Arc<Front>) {
    let mut reader = BufReader::new(client.try_clone().unwrap());
    let mut to_client = client.try_clone().unwrap();
    let mut upstream: Option<TcpStream> = None;
    while let Some(head) = read_head(&mut reader) {
        front.requests.lock().unwrap().push(format!("{} {}", head.method, head.target));
        let token = head.field("authorization").and_then(|a| a.strip_prefix("Bearer ")).map(str::to_string);
        let allowed = match token {
            Some(t) => t == STATIC_TOKEN || front.issued.lock().unwrap().contains(&t),
            None => front.public_reads && matches!(head.method.as_str(), "GET" | "HEAD"),
        };
        let mut body = (&mut reader).take(head.content_length());
        if !allowed {
            if std::io::copy(&mut body, &mut std::io::sink()).is_err() {
                return;
            }
            let error = json!({ "error": { "code": 401, "message": "Invalid Credentials",
                "errors": [{ "message": "Invalid Credentials", "domain": "global", "reason": "authError" }] } });
            respond(&mut to_client, "401 Unauthorized", &error);
            continue;
        }
        if upstream.is_none() {
            let Ok(server) = TcpStream::connect(("127.0.0.1", upstream_port)) else {
                let _ = client.shutdown(Shutdown::Both);
                return;
            };
            front.streams.lock().unwrap().push(server.try_clone().unwrap());
            let (mut from_server, mut back) = (server.try_clone().unwrap(), client.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut from_server, &mut back);
                // The emulator closed: so does the client's connection.
                let _ = back.shutdown(Shutdown::Both);
            });
            upstream = Some(server);
        }
        let server = upstream.as_mut().unwrap();
        if server.write_all(&head.raw).is_err() || std::io::copy(&mut body, server).is_err() {
            let _ = client.shutdown(Shutdown::Both);
            return;
        }
    }
}

/// The token endpoint: an assertion whose claims are right and whose
/// signature the account's public key verifies gets a new token; any other
/// gets Google's `invalid_grant`.
fn token_endpoint(mut client: TcpStream, front: Arc<Front>) {
    let mut reader = BufReader::new(client.try_clone().unwrap());
    while let Some(head) = read_head(&mut reader) {
        let mut form = String::new();
        if (&mut reader).take(head.content_length()).read_to_string(&mut form).is_err() {
            return;
        }
        let assertion = form.split('&').find_map(|p| p.strip_prefix("assertion=")).unwrap_or("");
        if head.method != "POST" || head.target != "/token" || !valid_assertion(assertion, &front) {
            front.refused.fetch_add(1, Ordering::SeqCst);
            let error = json!({ "error": "invalid_grant", "error_description": "Invalid JWT Signature." });
            respond(&mut client, "400 Bad Request", &error);
            continue;
        }
        let token = {
            let mut issued = front.issued.lock().unwrap();
            let token = format!("ya29.fake-{}", issued.len() + 1);
            issued.insert(token.clone());
            token
        };
        respond(&mut client, "200 OK", &json!({ "access_token": token, "expires_in": 3599, "token_type": "Bearer" }));
    }
}

fn valid_assertion(jwt: &str, front: &Front) -> bool {
    let parts: Vec<&str> = jwt.split('.').collect();
    let [header, claims, signature] = parts[..] else { return false };
    let decode = |p: &str| -> Option<Value> { serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).ok()?).ok() };
    let (Some(h), Some(c), Ok(sig)) = (decode(header), decode(claims), URL_SAFE_NO_PAD.decode(signature)) else {
        return false;
    };
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let (iat, exp) = (c["iat"].as_u64().unwrap_or(0), c["exp"].as_u64().unwrap_or(0));
    let claims_right = h["alg"] == "RS256"
        && c["iss"] == EMAIL
        && c["aud"] == front.token_url.as_str()
        && c["scope"]
            .as_str()
            .is_some_and(|s| s.split(' ').any(|s| s.starts_with("https://www.googleapis.com/auth/devstorage.")))
        && iat.abs_diff(now) < 300
        && exp > now
        && exp - iat <= 3600;
    claims_right && verified(&format!("{header}.{claims}"), &sig, &front.public_key, &front.dir)
}

/// RS256: `openssl dgst -sha256 -verify` of `signed` against `public_key`.
fn verified(signed: &str, signature: &[u8], public_key: &Path, dir: &Path) -> bool {
    let scratch = tempfile::tempdir_in(dir).unwrap();
    let (data, sig) = (scratch.path().join("data"), scratch.path().join("sig"));
    fs::write(&data, signed).unwrap();
    fs::write(&sig, signature).unwrap();
    let out = Command::new("openssl")
        .args(["dgst", "-sha256", "-verify"])
        .arg(public_key)
        .arg("-signature")
        .arg(&sig)
        .arg(&data)
        .output_within(Duration::from_secs(30));
    out.status.success() && text(&out.stdout).contains("Verified OK")
}
