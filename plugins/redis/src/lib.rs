//! `redis`: a remote cache backend on a Redis server (or anything speaking its
//! protocol: Valkey, KeyDB, Dragonfly), shared by every machine pointed at it.
//!
//! Layout, under `prefix` (default `gocp/`):
//! - `<prefix>ac/<64 hex action id>`: the entry, as [`Entry::to_line`] writes it.
//! - `<prefix>cas/<64 hex output id>`: the body, raw.
//!
//! Each instance keeps one TCP connection (RESP2 over wasi:sockets), opened at
//! its first call, not in `open`: every go command pays for `open`, and a bad
//! server or password then shows up as the first call's `unavailable` answer,
//! which never fails a build. A connection that failed is dropped and the next
//! call opens a new one. Bodies stream through in chunks, in both directions.
//!
//! It must never buffer a whole body, never retry a body upload (the host's
//! stream is read once), and never leave a connection in use after an error
//! that may have left a reply unread.

mod resp;

use std::io::{self, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use gocp_plugin_sdk::SEND_WITHOUT_ASKING;
use gocp_plugin_sdk::{
    Backend, Capabilities, Config, ConfigKey, Digest, Entry, Error, Info, InputStream, MAX_ENTRY_LINE, OutputStream,
    StreamError, copy_from_stream, export_backend, hex, write_all,
};
use resp::{Head, ReadError, Reply};

const DEFAULT_PREFIX: &str = "gocp/";
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Redis refuses larger values (`proto-max-bulk-len`, 512 MiB by default).
const DEFAULT_MAX_BODY: u64 = 512 << 20;
const DEFAULT_PORT: u16 = 6379;
/// What a body download was doing when it failed before any byte reached the host.
const ASKING_FOR_BODY: &str = "asking for a body";
/// How much of a body moves per read or write.
const CHUNK: usize = 1 << 20;

struct Settings {
    target: Target,
    prefix: String,
    /// Seconds; `None` keeps keys until Redis evicts them.
    ttl: Option<u64>,
    timeout: Duration,
    max_body: u64,
}

struct Redis {
    settings: Settings,
    conn: Option<BufReader<TcpStream>>,
    /// Where body chunks pass through on their way to the host: kept, so a
    /// download does not allocate and zero up to a chunk each time.
    buf: Vec<u8>,
}

/// Why a call failed, before it becomes an SDK error with the server's name.
enum Failure {
    /// Connecting, reading or writing failed: `doing` says which.
    Io { doing: &'static str, error: io::Error },
    /// The server answered with an error reply.
    Refused(String),
    /// The server's answer makes no sense for the command.
    Protocol(String),
    /// A reply or stored value that breaks the layout.
    Broken(String),
}

impl Failure {
    fn read(doing: &'static str, e: ReadError) -> Failure {
        match e {
            ReadError::Io(error) => Failure::Io { doing, error },
            ReadError::Protocol(m) => Failure::Protocol(format!("{doing}: {m}")),
            ReadError::TooLarge(n) => Failure::Broken(format!("{doing}: a value of {n} bytes, far too long")),
        }
    }

    fn io(doing: &'static str) -> impl FnOnce(io::Error) -> Failure {
        move |error| Failure::Io { doing, error }
    }

    /// Whether the connection may hold unread bytes or be dead: then it is dropped.
    fn spoils_connection(&self) -> bool {
        !matches!(self, Failure::Refused(_))
    }
}

impl Redis {
    fn key(&self, kind: &str, id: &Digest) -> Vec<u8> {
        format!("{}{kind}/{}", self.settings.prefix, hex(id)).into_bytes()
    }

    /// Turns a failure into the error the host reports, naming the server and
    /// what to change where there is something to change.
    fn error(&self, failure: Failure) -> Error {
        let s = &self.settings;
        let server = &s.target.server;
        match failure {
            Failure::Io { doing, error } => {
                let cause = match error.kind() {
                    ErrorKind::TimedOut | ErrorKind::WouldBlock => {
                        format!("no answer within {:?} (raise timeout= if the server is slow)", s.timeout)
                    }
                    ErrorKind::PermissionDenied => {
                        format!("connection not allowed: grant it with --allow-net {server} ({error})")
                    }
                    _ => error.to_string(),
                };
                Error::Unavailable(format!("redis at {server}: {doing}: {cause}"))
            }
            Failure::Refused(reply) if is_credentials_error(&reply) => Error::Unavailable(format!(
                "redis at {server} refused the credentials ({reply}): check the user and password in {}",
                s.target.password_source
            )),
            Failure::Refused(reply) if reply.starts_with("WRONGTYPE") => {
                Error::Broken(format!("redis at {server}: a key under prefix {:?} is not a string: {reply}", s.prefix))
            }
            Failure::Refused(reply) => Error::Unavailable(format!("redis at {server}: {reply}")),
            Failure::Protocol(m) | Failure::Broken(m) => Error::Broken(format!("redis at {server}: {m}")),
        }
    }

    /// The instance's connection, opened (and authenticated) if there is none.
    fn connection(&mut self) -> Result<&mut BufReader<TcpStream>, Failure> {
        if self.conn.is_none() {
            self.conn = Some(connect(&self.settings)?);
        }
        Ok(self.conn.as_mut().expect("connected just above"))
    }

    /// Sends a small command and reads its reply. A connection kept from an
    /// earlier call may have been closed by the server meanwhile (a restart,
    /// an idle timeout): such a failure gets one retry on a new connection.
    fn call(&mut self, args: &[&[u8]], max_bulk: u64) -> Result<Reply, Error> {
        let reused = self.conn.is_some();
        let result = match self.try_call(args, max_bulk) {
            Err(Failure::Io { error, .. }) if reused && !is_timeout(&error) => {
                self.conn = None;
                self.try_call(args, max_bulk)
            }
            other => other,
        };
        self.outcome(result)
    }

    fn try_call(&mut self, args: &[&[u8]], max_bulk: u64) -> Result<Reply, Failure> {
        let conn = self.connection()?;
        conn.get_mut().write_all(&resp::encode(args)).map_err(Failure::io("sending a command"))?;
        match resp::read_reply(conn, max_bulk).map_err(|e| Failure::read("reading a reply", e))? {
            Reply::Error(e) => Err(Failure::Refused(e)),
            reply => Ok(reply),
        }
    }

    /// Drops the connection after a failure that may have spoiled it.
    fn outcome<T>(&mut self, result: Result<T, Failure>) -> Result<T, Error> {
        result.map_err(|f| {
            if f.spoils_connection() {
                self.conn = None;
            }
            self.error(f)
        })
    }

    /// Whether `key` exists, refreshing its time to live when there is one.
    fn exists(&mut self, key: &[u8]) -> Result<bool, Error> {
        let reply = match self.settings.ttl {
            Some(ttl) => self.call(&[b"EXPIRE", key, ttl.to_string().as_bytes()], 0)?,
            None => self.call(&[b"EXISTS", key], 0)?,
        };
        match reply {
            Reply::Integer(n) => Ok(n > 0),
            other => Err(self.unexpected("EXISTS/EXPIRE", other)),
        }
    }

    /// A GET, or with a time to live a GETEX that also refreshes it.
    fn get_command<'a>(&self, key: &'a [u8], ttl: &'a [u8]) -> Vec<&'a [u8]> {
        match self.settings.ttl {
            Some(_) => vec![b"GETEX", key, b"EX", ttl],
            None => vec![b"GET", key],
        }
    }

    fn unexpected(&mut self, command: &str, reply: Reply) -> Error {
        self.conn = None;
        self.error(Failure::Protocol(format!("unexpected reply to {command}: {reply:?}")))
    }

    /// Streams `size` bytes from the host into a SET of `key`.
    fn upload(&mut self, key: &[u8], size: u64, body: &InputStream) -> Result<(), Failure> {
        let ttl = self.settings.ttl.map(|t| t.to_string());
        let conn = self.connection()?;
        let mut head = resp::command(if ttl.is_some() { 5 } else { 3 });
        resp::arg(&mut head, b"SET");
        resp::arg(&mut head, key);
        resp::bulk_head(&mut head, size);
        let socket = conn.get_mut();
        // The command goes out in writes of about a chunk each, head and tail
        // included: a small body is one write, not three, so the tail never
        // waits on Nagle's algorithm for the ACK of the body (40 ms each).
        let mut out = head;
        let mut sent = 0u64;
        while sent < size {
            let chunk = match body.blocking_read((size - sent).min(CHUNK as u64)) {
                Ok(chunk) => chunk,
                Err(StreamError::Closed) => break,
                Err(StreamError::LastOperationFailed(e)) => {
                    return Err(Failure::Broken(format!("reading the body from the host: {}", e.to_debug_string())));
                }
            };
            if out.len() + chunk.len() > CHUNK {
                socket.write_all(&out).map_err(Failure::io("sending a body"))?;
                out.clear();
            }
            out.extend_from_slice(&chunk);
            sent += chunk.len() as u64;
        }
        if sent != size {
            // The server is still waiting for the rest: the connection is dropped
            // (Failure::Broken spoils it), and Redis discards the partial command.
            return Err(Failure::Broken(format!("the host's body stream ended after {sent} of {size} bytes")));
        }
        out.extend_from_slice(b"\r\n");
        if let Some(ttl) = &ttl {
            resp::arg(&mut out, b"EX");
            resp::arg(&mut out, ttl.as_bytes());
        }
        socket.write_all(&out).map_err(Failure::io("sending a body"))?;
        match resp::read_reply(conn, 0).map_err(|e| Failure::read("reading the reply to a body", e))? {
            Reply::Simple(ok) if ok == "OK" => Ok(()),
            Reply::Error(e) => Err(Failure::Refused(e)),
            other => Err(Failure::Protocol(format!("unexpected reply to SET: {other:?}"))),
        }
    }

    /// Stores a body small enough to hold in memory as one command, which
    /// (unlike a streamed upload) can be sent again on a new connection when
    /// the server closed the one kept open, as a restart does.
    fn set_small(&mut self, key: &[u8], size: u64, body: &InputStream) -> Result<(), Error> {
        let mut bytes = Vec::with_capacity(size as usize);
        copy_from_stream(body, &mut bytes)?;
        if bytes.len() as u64 != size {
            return Err(Error::Broken(format!("the host's body stream ended after {} of {size} bytes", bytes.len())));
        }
        let ttl = self.settings.ttl.map(|t| t.to_string());
        let mut command: Vec<&[u8]> = vec![b"SET", key, &bytes];
        if let Some(ttl) = &ttl {
            command.extend([b"EX".as_slice(), ttl.as_bytes()]);
        }
        match self.call(&command, 0)? {
            Reply::Simple(ok) if ok == "OK" => Ok(()),
            other => Err(self.unexpected("SET", other)),
        }
    }

    /// Streams the value of `key` (expected to be `size` bytes) into `sink`.
    fn download(&mut self, key: &[u8], size: u64, sink: &OutputStream) -> Result<Result<(), Error>, Failure> {
        let mut buf = std::mem::take(&mut self.buf);
        let result = self.download_through(key, size, sink, &mut buf);
        self.buf = buf;
        result
    }

    fn download_through(
        &mut self,
        key: &[u8],
        size: u64,
        sink: &OutputStream,
        buf: &mut Vec<u8>,
    ) -> Result<Result<(), Error>, Failure> {
        let ttl = self.settings.ttl.unwrap_or(0).to_string();
        let command = resp::encode(&self.get_command(key, ttl.as_bytes()));
        let conn = self.connection()?;
        conn.get_mut().write_all(&command).map_err(Failure::io(ASKING_FOR_BODY))?;
        let len = match resp::read_head(conn).map_err(|e| Failure::read(ASKING_FOR_BODY, e))? {
            Head::Bulk(len) => len,
            Head::Nil => return Ok(Err(Error::NotFound)),
            Head::Error(e) => return Err(Failure::Refused(e)),
            other => return Err(Failure::Protocol(format!("unexpected reply to GET: {other:?}"))),
        };
        if len != size {
            return Err(Failure::Broken(format!(
                "{} holds {len} bytes but its entry says {size}",
                String::from_utf8_lossy(key)
            )));
        }
        // Sizes are u64 and usize is 32 bits here: bound before converting.
        let chunk = size.min(CHUNK as u64) as usize;
        if buf.len() < chunk {
            buf.resize(chunk, 0);
        }
        let mut left = size;
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            conn.read_exact(&mut buf[..n]).map_err(Failure::io("reading a body"))?;
            if let Err(e) = write_all(sink, &buf[..n]) {
                // The rest of the value is unread: this connection is out of step.
                self.conn = None;
                return Ok(Err(e));
            }
            left -= n as u64;
        }
        resp::finish_bulk(conn).map_err(|e| Failure::read("reading a body", e))?;
        Ok(Ok(()))
    }
}

/// Opens a connection to the first address of the server that accepts,
/// authenticates and selects the database.
fn connect(s: &Settings) -> Result<BufReader<TcpStream>, Failure> {
    let addrs: Vec<SocketAddr> =
        s.target.server.to_socket_addrs().map_err(Failure::io("looking up the server's address"))?.collect();
    let mut last = io::Error::new(ErrorKind::NotFound, "the name resolved to no address");
    let mut stream = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, s.timeout) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = e,
        }
    }
    let stream = stream.ok_or_else(|| Failure::Io { doing: "connecting", error: last })?;
    stream.set_read_timeout(Some(s.timeout)).map_err(Failure::io("setting the read timeout"))?;
    stream.set_write_timeout(Some(s.timeout)).map_err(Failure::io("setting the write timeout"))?;
    let mut conn = BufReader::with_capacity(64 << 10, stream);
    let mut hello = Vec::new();
    let mut replies = 0;
    if let Some(password) = &s.target.password {
        hello.extend(match &s.target.user {
            Some(user) => resp::encode(&[b"AUTH", user.as_bytes(), password.as_bytes()]),
            None => resp::encode(&[b"AUTH", password.as_bytes()]),
        });
        replies += 1;
    }
    if s.target.db != 0 {
        hello.extend(resp::encode(&[b"SELECT", s.target.db.to_string().as_bytes()]));
        replies += 1;
    }
    if replies == 0 {
        return Ok(conn);
    }
    // AUTH and SELECT go out together: one round trip. Both replies are read
    // before judging, so that the connection stays in step.
    conn.get_mut().write_all(&hello).map_err(Failure::io("authenticating"))?;
    let mut refused = None;
    for _ in 0..replies {
        match resp::read_reply(&mut conn, 0).map_err(|e| Failure::read("authenticating", e))? {
            Reply::Simple(_) => {}
            Reply::Error(e) => {
                refused.get_or_insert(e);
            }
            other => return Err(Failure::Protocol(format!("unexpected reply to AUTH/SELECT: {other:?}"))),
        }
    }
    match refused {
        // Refused is an answer, not a broken connection, but this one is not
        // set up: it is dropped here and the next call tries again.
        Some(e) => Err(Failure::Refused(e)),
        None => Ok(conn),
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock)
}

/// Error replies that mean the user, password or their permissions are wrong.
fn is_credentials_error(reply: &str) -> bool {
    ["WRONGPASS", "NOAUTH", "NOPERM", "ERR AUTH", "ERR Client sent AUTH", "ERR invalid password"]
        .iter()
        .any(|p| reply.starts_with(p))
}

/// Where to connect and how to log in, from `url` and `password-env`.
#[derive(Debug)]
struct Target {
    /// `host:port` as the user wrote it, for connecting and for messages.
    server: String,
    user: Option<String>,
    password: Option<String>,
    /// Where the password came from, for the message when it is refused
    /// (messages never show the password itself).
    password_source: String,
    db: u32,
}

/// Parses `url` (and `password-env`) into a `Target`.
fn parse_url(url: &str, password_env: Option<String>) -> Result<Target, Error> {
    // Messages show the url with its password masked: they end up in build logs.
    let parsed = url::Url::parse(url)
        .map_err(|e| Error::InvalidConfig(format!("url: {e}; expected redis://[user:password@]host:port[/db]")))?;
    let mut shown = parsed.clone();
    if parsed.password().is_some() {
        let _ = shown.set_password(Some("***"));
    }
    let invalid = |why: &str| Error::InvalidConfig(format!("url={shown}: {why}"));
    match parsed.scheme() {
        "redis" => {}
        "rediss" => return Err(invalid("TLS (rediss://) is not supported: use redis:// through a local TLS tunnel")),
        other => return Err(invalid(&format!("scheme {other}: expected redis://[user:password@]host:port[/db]"))),
    }
    let host = parsed.host_str().filter(|h| !h.is_empty()).ok_or_else(|| invalid("no host"))?;
    let server = format!("{host}:{}", parsed.port().unwrap_or(DEFAULT_PORT));
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(invalid("no ?query or #fragment is understood here; use the plugin's keys instead"));
    }
    let db = match parsed.path().trim_start_matches('/') {
        "" => 0,
        db => db.parse::<u32>().map_err(|_| invalid(&format!("database {db:?}: expected a number, as in /0")))?,
    };
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .map(|s| s.into_owned())
            .map_err(|_| invalid("the user or password is not UTF-8 once %-decoded"))
    };
    let user = Some(decode(parsed.username())?).filter(|u| !u.is_empty());
    let (password, source) = match password_env {
        Some(var) => match std::env::var(&var) {
            Ok(p) => (Some(p), format!("${var} (password-env)")),
            Err(_) => {
                return Err(Error::InvalidConfig(format!(
                    "password-env={var}: the variable is not visible to the plugin: set {var} and grant it with --allow-env {var}"
                )));
            }
        },
        None => match parsed.password() {
            Some(p) => (Some(decode(p)?), "url=".to_string()),
            None => (None, "url= (it has none: redis://:PASSWORD@host:port, or password-env=VAR)".to_string()),
        },
    };
    if user.is_some() && password.is_none() {
        return Err(invalid("a user without a password: add :PASSWORD to the url or use password-env=VAR"));
    }
    Ok(Target { server, user, password, password_source: source, db })
}

impl Backend for Redis {
    fn describe() -> Info {
        let key = |name: &str, help: &str| ConfigKey { name: name.into(), help: help.into() };
        Info {
            name: "redis".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            summary: "entries and bodies on a Redis server shared by many machines (RESP2 over TCP)".into(),
            max_instances: 0,
            config_keys: vec![
                key(
                    "url",
                    "redis://[user:password@]host:port[/db], required; grant the host:port with --allow-net (port default 6379, db default 0)",
                ),
                key(
                    "password-env",
                    "environment variable holding the password, overriding the url's; grant it with --allow-env (default none)",
                ),
                key(
                    "prefix",
                    "prepended to every key, to keep teams or projects apart and clean up by pattern; not needed for correctness, Go's action ids already cover inputs and Go version (default gocp/)",
                ),
                key(
                    "ttl",
                    "expire entries and bodies this long after their last store or remote hit, e.g. 7d (default: never; then rely on Redis' maxmemory eviction)",
                ),
                key("timeout", "longest wait on the server for a connect, a read or a write (default 5s)"),
                key(
                    "max-body",
                    "bodies larger than this stay local only (default 512MiB, Redis' own proto-max-bulk-len)",
                ),
            ],
        }
    }

    fn open(mut config: Config) -> Result<(Self, Capabilities), Error> {
        let url = config.take("url").ok_or_else(|| {
            Error::InvalidConfig(
                "url is required, e.g. --config url=redis://127.0.0.1:6379 --allow-net 127.0.0.1:6379".into(),
            )
        })?;
        let password_env = config.take("password-env");
        let target = parse_url(&url, password_env)?;
        let prefix = config.take("prefix").unwrap_or_else(|| DEFAULT_PREFIX.into());
        let ttl = match config.take("ttl") {
            None => None,
            Some(v) => match gocp_plugin_sdk::parse_duration(&v) {
                Some(d) if d.as_secs() >= 1 => Some(d.as_secs()),
                _ => {
                    return Err(Error::InvalidConfig(format!(
                        "ttl={v}: expected a duration of 1s or more, such as 7d"
                    )));
                }
            },
        };
        let timeout = config.take_duration("timeout", DEFAULT_TIMEOUT)?;
        if timeout.is_zero() {
            return Err(Error::InvalidConfig("timeout=0: expected a duration such as 5s".into()));
        }
        let max_body = config.take_size("max-body", DEFAULT_MAX_BODY)?;
        config.finish()?;
        let settings = Settings { target, prefix, ttl, timeout, max_body };
        Ok((Redis { settings, conn: None, buf: Vec::new() }, Capabilities { stores_bodies: true }))
    }

    fn read_entry(&mut self, action_id: &Digest) -> Result<Entry, Error> {
        let key = self.key("ac", action_id);
        let ttl = self.settings.ttl.unwrap_or(0).to_string();
        let command = self.get_command(&key, ttl.as_bytes());
        let text = match self.call(&command, MAX_ENTRY_LINE as u64)? {
            Reply::Nil => return Err(Error::NotFound),
            Reply::Bulk(text) => text,
            other => return Err(self.unexpected("GET", other)),
        };
        let entry = std::str::from_utf8(&text).ok().and_then(Entry::parse).ok_or_else(|| {
            Error::Broken(format!(
                "redis at {}: {} does not hold an entry: {:?}",
                self.settings.target.server,
                String::from_utf8_lossy(&key),
                String::from_utf8_lossy(&text)
            ))
        })?;
        if self.settings.ttl.is_some() {
            // The body must live as long as the entry pointing at it. A failure
            // here costs at worst a later miss; the entry itself was read.
            let _ = self.exists(&self.key("cas", &entry.output_id));
        }
        Ok(entry)
    }

    fn write_entry(&mut self, action_id: &Digest, entry: Entry) -> Result<(), Error> {
        let key = self.key("ac", action_id);
        let line = entry.to_line();
        let reply = match self.settings.ttl {
            Some(ttl) => self.call(&[b"SET", &key, line.as_bytes(), b"EX", ttl.to_string().as_bytes()], 0)?,
            None => self.call(&[b"SET", &key, line.as_bytes()], 0)?,
        };
        match reply {
            Reply::Simple(ok) if ok == "OK" => Ok(()),
            other => Err(self.unexpected("SET", other)),
        }
    }

    fn read_body(&mut self, output_id: &Digest, size: u64, sink: &OutputStream) -> Result<(), Error> {
        let key = self.key("cas", output_id);
        let reused = self.conn.is_some();
        let result = match self.download(&key, size, sink) {
            // Nothing reached the sink yet: as in `call`, a connection the
            // server closed meanwhile gets one retry on a new one.
            Err(Failure::Io { doing: ASKING_FOR_BODY, error }) if reused && !is_timeout(&error) => {
                self.conn = None;
                self.download(&key, size, sink)
            }
            other => other,
        };
        self.outcome(result)?
    }

    fn write_body(&mut self, output_id: &Digest, size: u64, body: &InputStream) -> Result<(), Error> {
        if size > self.settings.max_body {
            // Redis would refuse it; the host keeps it locally either way.
            return Ok(());
        }
        let key = self.key("cas", output_id);
        if size <= SEND_WITHOUT_ASKING {
            return self.set_small(&key, size, body);
        }
        // Bodies never change: a large one already there is not uploaded again.
        if self.exists(&key)? {
            return Ok(());
        }
        let result = self.upload(&key, size, body);
        self.outcome(result)
    }
}

export_backend!(Redis);

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(url: &str) -> Result<Target, Error> {
        parse_url(url, None)
    }

    #[test]
    fn urls_parse_into_server_credentials_and_db() {
        let t = settings("redis://127.0.0.1:6380").unwrap();
        assert_eq!((t.server.as_str(), t.user, t.password, t.db), ("127.0.0.1:6380", None, None, 0));
        assert_eq!(settings("redis://localhost").unwrap().server, "localhost:6379");
        assert_eq!(settings("redis://[::1]:7000/3").unwrap().server, "[::1]:7000");
        let t = settings("redis://ci:p%40ss@10.0.0.1:6379/2").unwrap();
        assert_eq!((t.user.as_deref(), t.password.as_deref(), t.db), (Some("ci"), Some("p@ss"), 2));
        let t = settings("redis://:secret@h:1").unwrap();
        assert_eq!((t.user, t.password.as_deref()), (None, Some("secret")));
    }

    #[test]
    fn bad_urls_say_what_to_change() {
        for (url, says) in [
            ("127.0.0.1:6379", "expected redis://"),
            ("http://h:1", "scheme http"),
            ("rediss://h:1", "TLS"),
            ("redis://h:1/x", "database"),
            ("redis://h:1/0?timeout=1", "query"),
            ("redis://ci@h:1", "a user without a password"),
            ("redis://:s3cret@h:1/x", "url=redis://:***@h:1/x: database"),
        ] {
            match settings(url) {
                Err(Error::InvalidConfig(m)) => assert!(m.contains(says) && !m.contains("s3cret"), "{url}: {m}"),
                other => panic!("{url}: {other:?}"),
            }
        }
        match parse_url("redis://h:1", Some("GOCP_TEST_SURELY_UNSET".into())) {
            Err(Error::InvalidConfig(m)) => {
                assert!(m.contains("set GOCP_TEST_SURELY_UNSET and grant it with --allow-env GOCP_TEST_SURELY_UNSET"))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn credential_replies_are_recognised() {
        assert!(is_credentials_error("WRONGPASS invalid username-password pair or user is disabled."));
        assert!(is_credentials_error("NOAUTH Authentication required."));
        assert!(is_credentials_error(
            "ERR AUTH <password> called without any password configured for the default user."
        ));
        assert!(!is_credentials_error("OOM command not allowed when used memory > 'maxmemory'."));
    }

    fn open(pairs: &[(&str, &str)]) -> Result<Redis, Error> {
        let pairs = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Redis::open(Config::new(pairs)).map(|(redis, _)| redis)
    }

    #[test]
    fn keys_follow_the_shared_layout_under_the_prefix() {
        let d: Digest = std::array::from_fn(|i| i as u8);
        let redis = open(&[("url", "redis://127.0.0.1:1"), ("prefix", "team-a/")]).unwrap();
        assert_eq!(redis.key("ac", &d), format!("team-a/ac/{}", hex(&d)).into_bytes());
        let redis = open(&[("url", "redis://127.0.0.1:1")]).unwrap();
        assert_eq!(redis.key("cas", &d), format!("gocp/cas/{}", hex(&d)).into_bytes());
    }

    #[test]
    fn open_validates_every_key_without_connecting() {
        let url = ("url", "redis://127.0.0.1:1");
        let redis = open(&[url, ("ttl", "7d"), ("timeout", "2s"), ("max-body", "1MiB")]).unwrap();
        assert_eq!(redis.settings.ttl, Some(7 * 86_400));
        assert_eq!(redis.settings.max_body, 1 << 20);
        for (pairs, says) in [
            (vec![], "url is required"),
            (vec![url, ("ttl", "500ms")], "ttl=500ms"),
            (vec![url, ("timeout", "0s")], "timeout=0"),
            (vec![url, ("max-body", "big")], "max-body=big"),
            (vec![url, ("db", "1")], "unknown configuration key(s): db"),
        ] {
            match open(&pairs) {
                Err(Error::InvalidConfig(m)) => assert!(m.contains(says), "{pairs:?}: {m}"),
                Err(other) => panic!("{pairs:?}: {other:?}"),
                Ok(_) => panic!("{pairs:?} accepted"),
            }
        }
    }
}
