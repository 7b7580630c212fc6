//! `s3`: keeps gocp's entries and bodies in a bucket of any S3-compatible
//! store (AWS S3, MinIO, versitygw, Ceph RGW, R2, ...), so machines that share
//! the bucket share their Go build cache.
//!
//! Layout: `<prefix>ac/<action id hex>` holds an entry line (the SDK's
//! [`Entry::to_line`]) and `<prefix>cas/<output id hex>` the raw body. Requests
//! are signed with SigV4 by rusty-s3 (presigned URLs, UNSIGNED-PAYLOAD, so a
//! body is streamed and never hashed or held here) and sent over wasi:http
//! by gocp-http-client. This module owns the configuration, the layout and the
//! meaning of S3's answers; it must never contact the server from `open`
//! (every go command pays that latency) nor read a secret from a config value.

use std::time::Duration;

use gocp_http_client::{Body, Client, Method, Response};
use gocp_plugin_sdk::SEND_WITHOUT_ASKING;
use gocp_plugin_sdk::{
    Backend, Capabilities, Config, ConfigKey, Digest, Entry, Error, Info, InputStream, MAX_ENTRY_LINE, OutputStream,
    export_backend, hex,
};
use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};
use url::Url;

const DEFAULT_REGION: &str = "us-east-1";
const DEFAULT_PREFIX: &str = "gocp/";
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
const KEY_ID_VAR: &str = "AWS_ACCESS_KEY_ID";
const SECRET_VAR: &str = "AWS_SECRET_ACCESS_KEY";
const TOKEN_VAR: &str = "AWS_SESSION_TOKEN";

/// How long a signed URL stays valid. Each one is used at once and never
/// leaves the process; the hour is slack for a clock that is off, which S3
/// would otherwise report as an expired request.
const PRESIGN_EXPIRY: Duration = Duration::from_secs(3600);
/// How much of an error document is read to find its code and message.
const MAX_ERROR_BYTES: usize = 16 << 10;

struct S3 {
    bucket: Bucket,
    /// None: anonymous requests, for a bucket anyone may read.
    credentials: Option<Credentials>,
    prefix: String,
    client: Client,
    /// "s3 at HOST:PORT", how messages name the server.
    server: String,
    /// What to check when the server refuses the credentials.
    credentials_hint: String,
}

impl Backend for S3 {
    fn describe() -> Info {
        let key = |name: &str, help: &str| ConfigKey { name: name.into(), help: help.into() };
        Info {
            name: "s3".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            summary: "entries and bodies in an S3-compatible bucket, shared by every machine that uses it".into(),
            max_instances: 0,
            config_keys: vec![
                key("bucket", "the bucket to use (required; it must exist: gocp never creates one)"),
                key("region", "the bucket's region, used in signatures (default us-east-1)"),
                key(
                    "endpoint",
                    "the store's URL, e.g. http://127.0.0.1:7070 (default https://s3.<region>.amazonaws.com)",
                ),
                key(
                    "addressing",
                    "path (host/bucket/key) or virtual (bucket.host/key) (default virtual for amazonaws.com, else path)",
                ),
                key(
                    "prefix",
                    "prepended to every object key, to keep teams or projects apart and to clean up one of them; \
                     Go's action ids already cover the Go version and inputs, so sharing a prefix is safe (default gocp/)",
                ),
                key(
                    "credentials",
                    "none: send requests unsigned, to read a bucket anyone may read (a fork's read-only build without secrets)",
                ),
                key("access-key-id", "the access key id, which is not a secret (default: from the environment)"),
                key("access-key-id-env", "the variable holding the access key id (default AWS_ACCESS_KEY_ID)"),
                key(
                    "secret-access-key-env",
                    "the variable holding the secret key, granted with --allow-env (default AWS_SECRET_ACCESS_KEY)",
                ),
                key(
                    "session-token-env",
                    "the variable holding a session token, if any (default AWS_SESSION_TOKEN, used when granted)",
                ),
                key("timeout", "how long to wait to connect and for each reply from the store (default 5s)"),
            ],
        }
    }

    fn open(mut config: Config) -> Result<(Self, Capabilities), Error> {
        let bucket_name = config.take("bucket").ok_or_else(|| {
            Error::InvalidConfig("s3 needs a bucket: add --config bucket=NAME (an existing bucket)".into())
        })?;
        let region = config.take("region").unwrap_or_else(|| DEFAULT_REGION.into());
        if region.is_empty() || !region.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
            return Err(Error::InvalidConfig(format!("region={region}: expected a region name such as eu-west-1")));
        }
        let endpoint = endpoint(config.take("endpoint"), &region)?;
        let aws =
            endpoint.host_str().is_some_and(|h| h.ends_with(".amazonaws.com") || h.ends_with(".amazonaws.com.cn"));
        let style = match config.take("addressing").as_deref() {
            None if aws => UrlStyle::VirtualHost,
            None | Some("path") => UrlStyle::Path,
            Some("virtual") => UrlStyle::VirtualHost,
            Some(v) => return Err(Error::InvalidConfig(format!("addressing={v}: expected path or virtual"))),
        };
        check_bucket(&bucket_name, style)?;
        let prefix = config.take("prefix").unwrap_or_else(|| DEFAULT_PREFIX.into());
        if prefix.starts_with('/') || prefix.chars().any(char::is_control) {
            return Err(Error::InvalidConfig(format!(
                "prefix={prefix:?}: an object key prefix such as team-a/gocp/ (no leading /, no control characters)"
            )));
        }
        let timeout = config.take_duration("timeout", DEFAULT_TIMEOUT)?;
        if timeout.is_zero() {
            return Err(Error::InvalidConfig("timeout=0: give a duration such as 5s".into()));
        }
        let (credentials, credentials_hint) = credentials(&mut config)?;
        config.finish()?;

        let bucket = Bucket::new(endpoint.clone(), style, bucket_name.clone(), region).map_err(|e| {
            Error::InvalidConfig(format!("endpoint={endpoint} with bucket={bucket_name}: not usable: {e:?}"))
        })?;
        let server = format!("s3 at {}", &bucket.base_url()[url::Position::BeforeHost..url::Position::AfterPort]);
        let s3 = S3 { bucket, credentials, prefix, client: Client::new(timeout), server, credentials_hint };
        Ok((s3, Capabilities { stores_bodies: true }))
    }

    fn read_entry(&mut self, action_id: &Digest) -> Result<Entry, Error> {
        let key = format!("{}ac/{}", self.prefix, hex(action_id));
        let response = self.request(Method::Get, &key, Body::Empty)?;
        let what = self.what("GET", &key);
        if response.status != 200 {
            return Err(self.refusal(&response, &what));
        }
        let text = String::from_utf8_lossy(&response.bytes(MAX_ENTRY_LINE)?).into_owned();
        Entry::parse(&text).ok_or_else(|| {
            Error::Broken(format!(
                "{what}: not a gocp entry ({} bytes): delete the object or use another prefix",
                text.len()
            ))
        })
    }

    fn read_body(&mut self, output_id: &Digest, size: u64, sink: &OutputStream) -> Result<(), Error> {
        let key = format!("{}cas/{}", self.prefix, hex(output_id));
        let what = self.what("GET", &key);
        let response = self.request(Method::Get, &key, Body::Empty)?;
        if response.status != 200 {
            return Err(self.refusal(&response, &what));
        }
        response.body_into(sink, size, &what)
    }

    fn write_body(&mut self, output_id: &Digest, size: u64, body: &InputStream) -> Result<(), Error> {
        let key = format!("{}cas/{}", self.prefix, hex(output_id));
        // Bodies never change under their output id, so a large one already
        // there (from another machine, or an earlier run) need not travel again.
        if size > SEND_WITHOUT_ASKING {
            let head = self.request(Method::Head, &key, Body::Empty)?;
            match head.status {
                200 if head.content_length == Some(size) => return Ok(()),
                // A wrong size is a broken upload from elsewhere: replace it.
                200 | 404 => {}
                _ => return Err(self.refusal(&head, &self.what("HEAD", &key))),
            }
        }
        let response = self.request(Method::Put, &key, Body::Stream { from: body, size })?;
        match response.status {
            200 => Ok(()),
            _ => Err(self.refusal(&response, &self.what("PUT", &key))),
        }
    }

    fn write_entry(&mut self, action_id: &Digest, entry: Entry) -> Result<(), Error> {
        let key = format!("{}ac/{}", self.prefix, hex(action_id));
        let line = entry.to_line();
        let response = self.request(Method::Put, &key, Body::Bytes(line.as_bytes()))?;
        match response.status {
            200 => Ok(()),
            _ => Err(self.refusal(&response, &self.what("PUT", &key))),
        }
    }
}

impl S3 {
    fn what(&self, method: &str, key: &str) -> String {
        format!("{}: {method} {}/{key}", self.server, self.bucket.name())
    }

    fn request(&self, method: Method, key: &str, body: Body) -> Result<Response, Error> {
        let (name, url) = match method {
            Method::Get => ("GET", self.bucket.get_object(self.credentials.as_ref(), key).sign(PRESIGN_EXPIRY)),
            Method::Head => ("HEAD", self.bucket.head_object(self.credentials.as_ref(), key).sign(PRESIGN_EXPIRY)),
            _ => ("PUT", self.bucket.put_object(self.credentials.as_ref(), key).sign(PRESIGN_EXPIRY)),
        };
        self.client.send(method, &url, body, &self.what(name, key))
    }

    /// The error for a response that is not a success, from its status and
    /// S3 error document (HEAD responses have none: the status must do).
    fn refusal(&self, response: &Response, what: &str) -> Error {
        let document = String::from_utf8_lossy(&response.bytes(MAX_ERROR_BYTES).unwrap_or_default()).into_owned();
        let code = xml_field(&document, "Code");
        let detail = match (code, xml_field(&document, "Message")) {
            (Some(c), Some(m)) => format!("HTTP {} {c}: {m}", response.status),
            (Some(c), None) => format!("HTTP {} {c}", response.status),
            _ => format!("HTTP {}", response.status),
        };
        let bucket = self.bucket.name();
        match (response.status, code) {
            (404, None | Some("NoSuchKey")) => Error::NotFound,
            (404, Some("NoSuchBucket")) => Error::Unavailable(format!(
                "{}: bucket {bucket} does not exist: create it or change --config bucket=",
                self.server
            )),
            (401 | 403, _) | (400, Some("ExpiredToken" | "InvalidToken" | "InvalidAccessKeyId")) => Error::Unavailable(
                format!("{} refused the credentials ({detail}): {}", self.server, self.credentials_hint),
            ),
            (301 | 307, _) | (400, Some("AuthorizationHeaderMalformed" | "PermanentRedirect")) => {
                Error::Unavailable(format!(
                    "{what}: {detail}: bucket {bucket} is in another region or needs another endpoint: \
                     set --config region= (and endpoint=) to the bucket's"
                ))
            }
            (400, Some("RequestTimeTooSkewed")) => {
                Error::Unavailable(format!("{what}: {detail}: this machine's clock is off: fix it"))
            }
            (429 | 500..=599, _) => Error::Unavailable(format!("{what}: {detail}")),
            _ => Error::Broken(format!("{what}: unexpected {detail}")),
        }
    }
}

/// The endpoint URL: the configured one, checked, or AWS's for the region.
fn endpoint(given: Option<String>, region: &str) -> Result<Url, Error> {
    let Some(text) = given else {
        return Url::parse(&format!("https://s3.{region}.amazonaws.com"))
            .map_err(|e| Error::InvalidConfig(format!("region={region}: makes no valid endpoint: {e}")));
    };
    let bad = |why: &str| {
        Error::InvalidConfig(format!(
            "endpoint={text}: {why}: expected a URL such as https://s3.eu-west-1.amazonaws.com or http://127.0.0.1:7070"
        ))
    };
    let url = Url::parse(&text).map_err(|e| bad(&e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad("only http and https are supported"));
    }
    if url.host_str().is_none() {
        return Err(bad("no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad("credentials do not belong in the URL (see access-key-id-env and secret-access-key-env)"));
    }
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return Err(bad("give the store's root, without a path (the bucket is a key of its own)"));
    }
    Ok(url)
}

/// Bucket names go into the URL path or, with virtual addressing, into the
/// host name, where only DNS characters work.
fn check_bucket(name: &str, style: UrlStyle) -> Result<(), Error> {
    let dns = name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    let ok = match style {
        UrlStyle::VirtualHost => dns && !name.starts_with(['.', '-']) && !name.ends_with(['.', '-']),
        UrlStyle::Path => !name.contains(['/', '?', '#']) && !name.chars().any(|c| c.is_whitespace() || c.is_control()),
    };
    if name.is_empty() || !ok {
        let why = match style {
            UrlStyle::VirtualHost => "with addressing=virtual a bucket name may hold only a-z, 0-9, '.' and '-'",
            UrlStyle::Path => "a bucket name cannot hold '/', '?', '#' or spaces",
        };
        return Err(Error::InvalidConfig(format!("bucket={name}: {why}")));
    }
    Ok(())
}

/// The credentials, from the environment (or a literal access key id, which
/// is not a secret), or none with `credentials=none`. Secrets come only from
/// variables so that they never appear in GOCACHEPROG, in `ps` or in a CI
/// log. Also returns what to check when the server refuses them.
fn credentials(config: &mut Config) -> Result<(Option<Credentials>, String), Error> {
    match config.take("credentials").as_deref() {
        None => {}
        Some("none") => {
            let given = ["access-key-id", "access-key-id-env", "secret-access-key-env", "session-token-env"]
                .into_iter()
                .filter(|k| config.take(k).is_some())
                .collect::<Vec<_>>();
            if !given.is_empty() {
                return Err(Error::InvalidConfig(format!("credentials=none, yet {} given", given.join(", "))));
            }
            let hint = "the bucket is read without credentials: it must allow anyone to read (and this build \
                        should run with --read-only)";
            return Ok((None, hint.into()));
        }
        Some(v) => return Err(Error::InvalidConfig(format!("credentials={v}: the only value is none"))),
    }
    let missing = |var: &str, what: &str| {
        Error::InvalidConfig(format!("no {what}: set {var} and grant it with --allow-env {var}"))
    };
    let key_literal = config.take("access-key-id");
    let key_var = config.take("access-key-id-env");
    let (key, key_source) = match (key_literal, key_var) {
        (Some(_), Some(_)) => {
            return Err(Error::InvalidConfig("give access-key-id or access-key-id-env, not both".into()));
        }
        (Some(key), None) if !key.is_empty() => (key, "access-key-id".to_string()),
        (Some(_), None) => return Err(Error::InvalidConfig("access-key-id is empty".into())),
        (None, var) => {
            let var = var.unwrap_or_else(|| KEY_ID_VAR.into());
            let key = env(&var).ok_or_else(|| {
                Error::InvalidConfig(format!(
                    "no access key id: set {var} and grant it with --allow-env {var}, or give --config access-key-id="
                ))
            })?;
            (key, var)
        }
    };
    let secret_var = config.take("secret-access-key-env").unwrap_or_else(|| SECRET_VAR.into());
    let secret = env(&secret_var).ok_or_else(|| missing(&secret_var, "secret access key"))?;
    let token_var = config.take("session-token-env");
    let token = match &token_var {
        Some(var) => Some((env(var).ok_or_else(|| missing(var, "session token"))?, var.clone())),
        // The default variable is optional: long-lived keys have no token.
        None => env(TOKEN_VAR).map(|t| (t, TOKEN_VAR.to_string())),
    };
    let mut hint = format!("check the access key id {key} (from {key_source}) and the secret key in {secret_var}");
    let credentials = match token {
        Some((token, var)) => {
            hint.push_str(&format!(" and the session token in {var} (it may have expired)"));
            Credentials::new_with_token(key, secret, token)
        }
        None => Credentials::new(key, secret),
    };
    hint.push_str(" are valid and may read and write the bucket");
    Ok((Some(credentials), hint))
}

/// A variable the user granted; unset and empty are the same to a user.
fn env(var: &str) -> Option<String> {
    std::env::var(var).ok().filter(|v| !v.is_empty())
}

/// The text of the first `<name>` element of an S3 error document. Error
/// documents are flat and small; a full XML parser would add weight for two
/// fields whose absence only makes a message less specific.
fn xml_field<'a>(document: &'a str, name: &str) -> Option<&'a str> {
    let start = document.find(&format!("<{name}>"))? + name.len() + 2;
    let len = document[start..].find(&format!("</{name}>"))?;
    Some(document[start..start + len].trim()).filter(|s| !s.is_empty())
}

export_backend!(S3);
