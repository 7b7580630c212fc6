//! `http`: a remote cache on any server that speaks the Bazel HTTP remote-cache
//! protocol (bazel-remote, nginx or Apache WebDAV, many cache services).
//!
//! Layout under the URL's path, which is the namespace:
//! - `ac/<64 hex action id>`: the entry, one line as `Entry::to_line` writes it.
//! - `cas/<64 hex output id>`: the body, byte for byte, so a server that checks
//!   that a CAS object hashes to its name (bazel-remote does) accepts it.
//!
//! Each call is one or two requests (GET, or HEAD then PUT) through wasi:http
//! (gocp-http-client owns the exchange and its limits); the host decides
//! which addresses may be reached and does TLS. Bodies move in bounded chunks
//! both ways, whatever their size.
//!
//! It must never contact the server from `open` (every go command pays for
//! start-up; a wrong server or credentials show up at the first call instead),
//! never hold a whole body in memory, and never report a server's trouble as
//! anything the build has to care about.

use std::time::Duration;

use base64::Engine as _;
use gocp_http_client::{Body, Client, Method, Response};
use gocp_plugin_sdk::SEND_WITHOUT_ASKING;
use gocp_plugin_sdk::{
    Backend, Capabilities, Config, ConfigKey, Digest, Entry, Error, Info, InputStream, MAX_ENTRY_LINE, OutputStream,
    export_backend, hex,
};
use url::Url;

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the credentials came from, so that a refusal can say what to check.
enum Auth {
    None,
    Token(String),
    Basic(String),
}

struct Http {
    client: Client,
    /// The configured URL: each request's URL is it with another path.
    origin: Url,
    /// The URL's path, ending in `/`: `ac/` and `cas/` go under it.
    base: String,
    /// The URL without credentials, for messages.
    url: String,
    auth: Auth,
    /// Create collections with MKCOL before the first upload into them
    /// (plain WebDAV servers refuse a PUT whose parent does not exist).
    mkcol: bool,
    /// The kinds (`ac`, `cas`) whose collections this instance has made.
    made: Vec<&'static str>,
}

impl Http {
    fn path(&self, kind: &str, id: &Digest) -> String {
        format!("{}{kind}/{}", self.base, hex(id))
    }

    fn send(&self, method: Method, path: &str, body: Body<'_>) -> Result<Response, Error> {
        let what = format!("{}: {} {path}", self.url, method_name(&method));
        let mut url = self.origin.clone();
        url.set_path(path);
        self.client.send(method, &url, body, &what)
    }

    /// The error for a status that is neither success nor "not there".
    fn refused(&self, method: &str, path: &str, status: u16) -> Error {
        let at = format!("{}: {method} {path}", self.url);
        match status {
            401 | 403 => {
                let check = match &self.auth {
                    Auth::None => {
                        "the server wants credentials: set token-env=VAR or basic-env=VAR and grant VAR with --allow-env VAR"
                            .to_string()
                    }
                    Auth::Token(var) => format!("check the token in {var} (granted with --allow-env {var})"),
                    Auth::Basic(var) => format!("check user:password in {var} (granted with --allow-env {var})"),
                };
                Error::Unavailable(format!("credentials refused by {at} (HTTP {status}): {check}"))
            }
            405 | 501 => Error::Broken(format!(
                "{at}: HTTP {status}, method not allowed: the server must accept GET, HEAD and PUT (nginx: dav_methods PUT)"
            )),
            408 | 429 | 500..=599 => Error::Unavailable(format!("{at}: the server answered HTTP {status}")),
            413 => Error::Broken(format!(
                "{at}: HTTP 413, the body is larger than the server accepts: raise its limit (nginx: client_max_body_size 0)"
            )),
            _ => Error::Broken(format!(
                "{at}: unexpected HTTP {status}: is this a Bazel HTTP remote cache (GET/HEAD/PUT under /ac/ and /cas/)?"
            )),
        }
    }

    fn put(&mut self, kind: &'static str, path: &str, body: Body<'_>) -> Result<(), Error> {
        if self.mkcol && !self.made.contains(&kind) {
            self.make_collections(kind)?;
            self.made.push(kind);
        }
        let response = self.send(Method::Put, path, body)?;
        match response.status {
            200..=299 => Ok(()),
            409 if !self.mkcol => Err(Error::Broken(format!(
                "{}: PUT {path}: HTTP 409, the server wants the directories created first: add --config mkcol=true",
                self.url
            ))),
            s => Err(self.refused("PUT", path, s)),
        }
    }

    /// MKCOL on every collection from the URL's path down to `kind/`: once
    /// per instance, since each is a request and they only ever need making once.
    fn make_collections(&self, kind: &str) -> Result<(), Error> {
        let full = format!("{}{kind}/", self.base);
        let mut path = String::from("/");
        for segment in full.split('/').filter(|s| !s.is_empty()) {
            path.push_str(segment);
            path.push('/');
            let mkcol = || self.send(Method::Other("MKCOL".into()), &path, Body::Empty).map(|r| r.status);
            let mut status = mkcol()?;
            if (500..=599).contains(&status) {
                // Other instances make the same collections at the same
                // moment, and a server may fail the one that loses the race
                // (WsgiDAV answers 500 when the collection appeared between
                // its check and its mkdir). Asked again, it sees the
                // collection and answers 405; a server really in trouble
                // fails again.
                status = mkcol()?;
            }
            match status {
                // Made now, or already there (RFC 4918 answers 405 for an existing one).
                200..=299 | 405 => {}
                s => return Err(self.refused("MKCOL", &path, s)),
            }
        }
        Ok(())
    }
}

impl Backend for Http {
    fn describe() -> Info {
        let key = |name: &str, help: &str| ConfigKey { name: name.into(), help: help.into() };
        Info {
            name: "http".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            summary: "remote cache on a Bazel HTTP remote-cache server (bazel-remote, nginx WebDAV, ...)".into(),
            max_instances: 0,
            config_keys: vec![
                key(
                    "url",
                    "required: http[s]://HOST[:PORT][/PATH]; entries go to PATH/ac/, bodies to PATH/cas/; PATH separates teams or projects (Go's ids already cover Go versions and inputs); grant HOST:PORT with --allow-net",
                ),
                key(
                    "token-env",
                    "send `Authorization: Bearer <token>` with the token from this variable (grant it with --allow-env; default none)",
                ),
                key(
                    "basic-env",
                    "send HTTP basic auth with `user:password` from this variable (grant it with --allow-env; default none)",
                ),
                key(
                    "mkcol",
                    "true: create the directories with MKCOL before the first upload, for plain WebDAV servers such as Apache mod_dav (default false: bazel-remote and nginx with create_full_put_path need none)",
                ),
                key(
                    "timeout",
                    "give up on connecting or on a silent server after this long (default 5s; gocp's --plugin-timeout caps it)",
                ),
            ],
        }
    }

    fn open(mut config: Config) -> Result<(Self, Capabilities), Error> {
        let raw = config.take("url").ok_or_else(|| {
            Error::InvalidConfig(
                "url is required: --config url=http://HOST:PORT/PATH (and --allow-net HOST:PORT)".into(),
            )
        })?;
        let token_env = config.take("token-env");
        let basic_env = config.take("basic-env");
        let timeout = config.take_duration("timeout", DEFAULT_TIMEOUT)?;
        let mkcol = config.take_bool("mkcol", false)?;
        config.finish()?;
        if timeout.is_zero() {
            return Err(Error::InvalidConfig("timeout=0: give a duration such as 5s".into()));
        }

        let url = Url::parse(&raw)
            .map_err(|e| Error::InvalidConfig(format!("url={raw}: {e}: expected http[s]://HOST[:PORT][/PATH]")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Error::InvalidConfig(format!("url={raw}: scheme {}: expected http or https", url.scheme())));
        }
        if url.host_str().is_none() {
            return Err(Error::InvalidConfig(format!("url={raw}: no host: expected http[s]://HOST[:PORT][/PATH]")));
        };
        if !url.username().is_empty() || url.password().is_some() {
            return Err(Error::InvalidConfig(format!(
                "url={}: credentials in the URL end up in GOCACHEPROG and process lists: put user:password in a variable and name it with basic-env=VAR (granted with --allow-env VAR)",
                redacted(&url)
            )));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(Error::InvalidConfig(format!(
                "url={raw}: remove the ?query or #fragment: only a path is used"
            )));
        }
        let base = format!("{}/", url.path().trim_end_matches('/'));

        let auth = match (token_env, basic_env) {
            (Some(_), Some(_)) => {
                return Err(Error::InvalidConfig("token-env and basic-env are both set: choose one".into()));
            }
            (Some(var), None) => Auth::Token(var),
            (None, Some(var)) => Auth::Basic(var),
            (None, None) => Auth::None,
        };
        let client = Client::new(timeout);
        let client = match &auth {
            Auth::None => client,
            Auth::Token(var) => client.header("authorization", format!("Bearer {}", secret("token-env", var)?)),
            Auth::Basic(var) => {
                let pair = secret("basic-env", var)?;
                if !pair.contains(':') {
                    return Err(Error::InvalidConfig(format!(
                        "basic-env={var}: {var} must hold user:password (no colon found)"
                    )));
                }
                client.header(
                    "authorization",
                    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(pair)),
                )
            }
        };

        let http = Http {
            client,
            base,
            url: redacted(&url).trim_end_matches('/').to_string(),
            origin: url,
            auth,
            mkcol,
            made: Vec::new(),
        };
        Ok((http, Capabilities { stores_bodies: true }))
    }

    fn read_entry(&mut self, action_id: &Digest) -> Result<Entry, Error> {
        let path = self.path("ac", action_id);
        let response = self.send(Method::Get, &path, Body::Empty)?;
        match response.status {
            200 => {}
            404 => return Err(Error::NotFound),
            s => return Err(self.refused("GET", &path, s)),
        }
        let text = response.bytes(MAX_ENTRY_LINE + 1)?;
        // A plain WebDAV server (WsgiDAV, Apache mod_dav) creates the file
        // before it writes it, so a GET that meets an upload of this entry in
        // flight gets it empty. gocp never writes an empty entry: it is not
        // stored yet, and the next put of the action fills it.
        if text.is_empty() {
            return Err(Error::NotFound);
        }
        if text.len() > MAX_ENTRY_LINE {
            return Err(Error::Broken(format!(
                "{}: GET {path}: more than {MAX_ENTRY_LINE} bytes, not an entry gocp wrote: is another tool using this path?",
                self.url
            )));
        }
        std::str::from_utf8(&text).ok().and_then(Entry::parse).ok_or_else(|| {
            Error::Broken(format!(
                "{}: GET {path}: {:?} is not an entry gocp wrote: is another tool using this path?",
                self.url,
                String::from_utf8_lossy(&text[..text.len().min(80)])
            ))
        })
    }

    fn read_body(&mut self, output_id: &Digest, size: u64, sink: &OutputStream) -> Result<(), Error> {
        let path = self.path("cas", output_id);
        let response = self.send(Method::Get, &path, Body::Empty)?;
        match response.status {
            200 => {}
            404 => return Err(Error::NotFound),
            s => return Err(self.refused("GET", &path, s)),
        }
        let wrong_size = |got: u64| {
            Error::Broken(format!("{}: GET {path}: the body is {got} bytes, its entry says {size}", self.url))
        };
        if let Some(len) = response.content_length
            && len != size
        {
            return Err(wrong_size(len));
        }
        // It stops before writing more than `size` bytes into the host's store.
        let total = response.copy_to(sink, size)?;
        if total != size {
            return Err(wrong_size(total));
        }
        Ok(())
    }

    fn write_body(&mut self, output_id: &Digest, size: u64, body: &InputStream) -> Result<(), Error> {
        let path = self.path("cas", output_id);
        if size <= SEND_WITHOUT_ASKING {
            return self.put("cas", &path, Body::Stream { from: body, size });
        }
        // Bodies never change, so one already there (another machine stored
        // it) need not be sent again; one of another length is a leftover of
        // a broken upload and is replaced.
        let head = self.send(Method::Head, &path, Body::Empty)?;
        match head.status {
            // Some servers answer HEAD with a length of 0 whatever the object: only
            // another non-zero length means a different object.
            200 if head.content_length.is_none_or(|len| len == size || len == 0) => return Ok(()),
            200 | 404 => {}
            s => return Err(self.refused("HEAD", &path, s)),
        }
        drop(head);
        self.put("cas", &path, Body::Stream { from: body, size })
    }

    fn write_entry(&mut self, action_id: &Digest, entry: Entry) -> Result<(), Error> {
        let path = self.path("ac", action_id);
        self.put("ac", &path, Body::Bytes(entry.to_line().as_bytes()))
    }
}

/// A credential from a granted environment variable.
fn secret(key: &str, var: &str) -> Result<String, Error> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() && v.bytes().all(|b| (0x20..0x7f).contains(&b)) => Ok(v),
        Ok(v) if !v.is_empty() => Err(Error::InvalidConfig(format!(
            "{key}={var}: {var} holds characters that cannot go in an HTTP header (only printable ASCII)"
        ))),
        _ => Err(Error::InvalidConfig(format!(
            "{key}={var}: {var} is not set or empty: set {var} and grant it with --allow-env {var}"
        ))),
    }
}

/// The URL as messages show it: never with a password.
fn redacted(url: &Url) -> String {
    let mut shown = url.clone();
    let _ = shown.set_password(None);
    let _ = shown.set_username("");
    shown.to_string()
}

fn method_name(method: &Method) -> &str {
    match method {
        Method::Get => "GET",
        Method::Head => "HEAD",
        Method::Put => "PUT",
        Method::Other(m) => m,
        _ => "request",
    }
}

export_backend!(Http);
