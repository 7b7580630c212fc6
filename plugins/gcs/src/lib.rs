//! `gcs`: keeps gocp's entries and bodies in a Google Cloud Storage bucket,
//! through the JSON API over wasi:http, so machines that share the bucket
//! share their Go build cache.
//!
//! Layout: `<prefix>ac/<action id hex>` holds an entry line (the SDK's
//! [`Entry::to_line`], host data included) and `<prefix>cas/<output id hex>`
//! the raw body. A body of up to 16 MiB goes up in one request; a larger one
//! through a resumable upload session, 16 MiB per request. Bodies stream
//! both ways straight between the host and the connection, so none is ever
//! held here. Credentials are `auth`'s.
//!
//! This module owns the configuration, the layout and the meaning of the
//! API's answers. It must never contact Google from `open` (every go command
//! pays for start-up; a wrong bucket or key shows at the first call), never
//! read a secret from a configuration value, and never hold a whole body.

mod auth;

use std::time::Duration;

use auth::Auth;
use gocp_http_client::{Body, Client, Method, Response};
use gocp_plugin_sdk::SEND_WITHOUT_ASKING;
use gocp_plugin_sdk::{
    Backend, Capabilities, Config, ConfigKey, Digest, Entry, Error, Info, InputStream, MAX_ENTRY_LINE, OutputStream,
    export_backend, hex,
};
use serde_json::Value;
use url::Url;

const DEFAULT_ENDPOINT: &str = "https://storage.googleapis.com";
const DEFAULT_PREFIX: &str = "gocp/";
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bodies larger than this go through a resumable upload, this much per
/// request: a multiple of 256 KiB, as GCS wants every chunk but the last.
const CHUNK: u64 = 16 << 20;
/// How much of an error document or object resource is read.
const MAX_DOCUMENT: usize = 16 << 10;
/// GCS object names are at most 1024 bytes; `cas/` and 64 hex digits follow the prefix.
const MAX_PREFIX: usize = 1024 - 68;

struct Gcs {
    client: Client,
    /// The API's root: `<endpoint>/storage/v1/...` and `<endpoint>/upload/...`.
    endpoint: Url,
    bucket: String,
    prefix: String,
    auth: Auth,
    /// "gcs at HOST[:PORT]", how messages name the server.
    server: String,
}

impl Backend for Gcs {
    fn describe() -> Info {
        let key = |name: &str, help: &str| ConfigKey { name: name.into(), help: help.into() };
        Info {
            name: "gcs".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            summary: "entries and bodies in a Google Cloud Storage bucket, shared by every machine that uses it".into(),
            max_instances: 0,
            config_keys: vec![
                key("bucket", "the bucket to use (required; it must exist: gocp never creates one)"),
                key(
                    "key-env",
                    "a variable holding a service-account key (its JSON, or the path of its file, whose directory \
                     must be granted with --allow-dir DIR:ro), granted with --allow-env; its token_uri must be granted with --allow-net",
                ),
                key(
                    "token-env",
                    "a variable holding an OAuth2 access token (gcloud auth print-access-token, a CI's workload \
                     identity step), granted with --allow-env",
                ),
                key("credentials", "none: send requests without a token, to read a bucket anyone may read"),
                key(
                    "prefix",
                    "prepended to every object name, to keep teams or projects apart and to clean up one of them; \
                     Go's action ids already cover the Go version and inputs, so sharing a prefix is safe (default gocp/)",
                ),
                key(
                    "endpoint",
                    "the API's root URL, e.g. http://127.0.0.1:4443 for an emulator (default https://storage.googleapis.com)",
                ),
                key("timeout", "how long to wait to connect and for each reply (default 5s)"),
            ],
        }
    }

    fn open(mut config: Config) -> Result<(Self, Capabilities), Error> {
        let bucket = config.take("bucket").ok_or_else(|| {
            Error::InvalidConfig("gcs needs a bucket: add --config bucket=NAME (an existing bucket)".into())
        })?;
        let valid_bucket = bucket.len() >= 3
            && bucket.len() <= 222
            && bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
        if !valid_bucket {
            return Err(Error::InvalidConfig(format!(
                "bucket={bucket}: a bucket name has 3 to 222 characters, each a-z, 0-9, '-', '_' or '.'"
            )));
        }
        let endpoint = endpoint(config.take("endpoint"))?;
        let prefix = config.take("prefix").unwrap_or_else(|| DEFAULT_PREFIX.into());
        if prefix.starts_with('/') || prefix.chars().any(char::is_control) || prefix.len() > MAX_PREFIX {
            return Err(Error::InvalidConfig(format!(
                "prefix={prefix:?}: an object name prefix such as team-a/gocp/ (no leading /, no control characters, \
                 at most {MAX_PREFIX} bytes)"
            )));
        }
        let timeout = config.take_duration("timeout", DEFAULT_TIMEOUT)?;
        if timeout.is_zero() {
            return Err(Error::InvalidConfig("timeout=0: give a duration such as 5s".into()));
        }
        let auth = Auth::from_config(&mut config)?;
        config.finish()?;

        let server = format!("gcs at {}", &endpoint[url::Position::BeforeHost..url::Position::AfterPort]);
        let gcs = Gcs { client: Client::new(timeout), endpoint, bucket, prefix, auth, server };
        Ok((gcs, Capabilities { stores_bodies: true }))
    }

    fn read_entry(&mut self, action_id: &Digest) -> Result<Entry, Error> {
        let name = self.name("ac", action_id);
        let what = self.what("GET", &name);
        let response = self.send(Method::Get, &self.object_url(&name, "alt=media"), &[], Body::Empty, &what)?;
        if response.status != 200 {
            return Err(self.refusal(&response, &what));
        }
        let text = response.bytes(MAX_ENTRY_LINE + 1)?;
        std::str::from_utf8(&text).ok().filter(|_| text.len() <= MAX_ENTRY_LINE).and_then(Entry::parse).ok_or_else(
            || {
                Error::Broken(format!(
                    "{what}: not an entry gocp wrote ({} bytes): delete the object or use another prefix",
                    text.len()
                ))
            },
        )
    }

    fn read_body(&mut self, output_id: &Digest, size: u64, sink: &OutputStream) -> Result<(), Error> {
        let name = self.name("cas", output_id);
        let what = self.what("GET", &name);
        let response = self.send(Method::Get, &self.object_url(&name, "alt=media"), &[], Body::Empty, &what)?;
        if response.status != 200 {
            return Err(self.refusal(&response, &what));
        }
        response.body_into(sink, size, &what)
    }

    fn write_body(&mut self, output_id: &Digest, size: u64, body: &InputStream) -> Result<(), Error> {
        let name = self.name("cas", output_id);
        // Bodies never change under their output id, so a large one already
        // there (from another machine, or an earlier run) need not travel
        // again; one of another size is a leftover of something broken: replaced.
        if size > SEND_WITHOUT_ASKING {
            let what = self.what("GET", &name);
            let existing = self.send(Method::Get, &self.object_url(&name, "fields=size"), &[], Body::Empty, &what)?;
            match existing.status {
                200 => {
                    let resource: Value = serde_json::from_slice(&existing.bytes(MAX_DOCUMENT)?).unwrap_or(Value::Null);
                    if resource["size"].as_str().and_then(|s| s.parse().ok()) == Some(size) {
                        return Ok(());
                    }
                }
                404 => {}
                _ => return Err(self.refusal(&existing, &what)),
            }
        }
        if size <= CHUNK {
            self.upload(&name, Body::Stream { from: body, size })
        } else {
            self.upload_resumable(&name, body, size)
        }
    }

    fn write_entry(&mut self, action_id: &Digest, entry: Entry) -> Result<(), Error> {
        let name = self.name("ac", action_id);
        self.upload(&name, Body::Bytes(entry.to_line().as_bytes()))
    }
}

impl Gcs {
    fn name(&self, kind: &str, id: &Digest) -> String {
        format!("{}{kind}/{}", self.prefix, hex(id))
    }

    fn what(&self, method: &str, name: &str) -> String {
        format!("{}: {method} {}/{name}", self.server, self.bucket)
    }

    /// `<endpoint>/storage/v1/b/<bucket>/o/<name>?<query>`: the object
    /// (`alt=media`) or its resource (`fields=...`).
    fn object_url(&self, name: &str, query: &str) -> Url {
        let mut url = self.endpoint.clone();
        url.set_path(&format!("/storage/v1/b/{}/o/{}", self.bucket, escape(name)));
        url.set_query(Some(query));
        url
    }

    fn upload_url(&self, name: &str, kind: &str) -> Url {
        let mut url = self.endpoint.clone();
        url.set_path(&format!("/upload/storage/v1/b/{}/o", self.bucket));
        url.query_pairs_mut().append_pair("uploadType", kind).append_pair("name", name);
        url
    }

    /// Sends one request with the current token, if any.
    fn send(
        &mut self,
        method: Method,
        url: &Url,
        headers: &[(&str, String)],
        body: Body<'_>,
        what: &str,
    ) -> Result<Response, Error> {
        let mut headers = headers.to_vec();
        if let Some(token) = self.auth.bearer(&self.client)? {
            headers.push(("authorization", format!("Bearer {token}")));
        }
        self.client.send_with(method, url, &headers, body, what)
    }

    /// Stores `body` under `name` in one request.
    fn upload(&mut self, name: &str, body: Body<'_>) -> Result<(), Error> {
        let what = self.what("POST", name);
        let headers = [("content-type", "application/octet-stream".to_string())];
        let response = self.send(Method::Post, &self.upload_url(name, "media"), &headers, body, &what)?;
        match response.status {
            200 | 201 => Ok(()),
            _ => Err(self.upload_refusal(&response, &what)),
        }
    }

    /// Stores `size` bytes of `body` under `name` through a resumable
    /// session: one request opens it (so a refusal comes before any body
    /// moves), then one request per chunk, each streamed from the host.
    fn upload_resumable(&mut self, name: &str, body: &InputStream, size: u64) -> Result<(), Error> {
        let what = self.what("POST", name);
        let headers = [
            ("content-type", "application/json; charset=UTF-8".to_string()),
            ("x-upload-content-type", "application/octet-stream".to_string()),
            ("x-upload-content-length", size.to_string()),
        ];
        let opened =
            self.send(Method::Post, &self.upload_url(name, "resumable"), &headers, Body::Bytes(b"{}"), &what)?;
        if opened.status != 200 {
            return Err(self.upload_refusal(&opened, &what));
        }
        let session = opened
            .header("location")
            .and_then(|l| self.endpoint.join(l).ok())
            .ok_or_else(|| Error::Broken(format!("{what}: the upload session was opened without a Location")))?;
        drop(opened);
        let what = self.what("PUT", name);
        let mut sent = 0;
        while sent < size {
            let n = CHUNK.min(size - sent);
            let end = sent + n;
            let range = [("content-range", format!("bytes {sent}-{}/{size}", end - 1))];
            let response = self.send(Method::Put, &session, &range, Body::Stream { from: body, size: n }, &what)?;
            match response.status {
                200 | 201 if end == size => return Ok(()),
                // More to come: the server says how much it kept, which
                // must be all so far, since the next chunk starts there.
                308 if end < size => {
                    let kept = response.header("range").and_then(|r| r.strip_prefix("bytes=0-")?.parse::<u64>().ok());
                    if kept != Some(end - 1) {
                        return Err(Error::Unavailable(format!(
                            "{what}: the server kept {} of the first {end} bytes sent",
                            kept.map_or(0, |k| k + 1)
                        )));
                    }
                }
                _ => return Err(self.upload_refusal(&response, &what)),
            }
            sent = end;
        }
        Ok(())
    }

    /// A refusal of an upload: there, "not found" can only be the bucket.
    fn upload_refusal(&mut self, response: &Response, what: &str) -> Error {
        match self.refusal(response, what) {
            Error::NotFound => self.no_bucket(),
            e => e,
        }
    }

    fn no_bucket(&self) -> Error {
        Error::Unavailable(format!(
            "{}: bucket {} does not exist: create it or change --config bucket=",
            self.server, self.bucket
        ))
    }

    /// The error for an answer that is not a success, from its status and
    /// the API's JSON error document (HEAD-like answers may have none).
    fn refusal(&mut self, response: &Response, what: &str) -> Error {
        let status = response.status;
        let document: Value =
            serde_json::from_slice(&response.bytes(MAX_DOCUMENT).unwrap_or_default()).unwrap_or(Value::Null);
        let message = document["error"]["message"].as_str();
        let detail = match message {
            Some(m) => format!("HTTP {status}: {m}"),
            None => format!("HTTP {status}"),
        };
        match status {
            401 | 403 => {
                if status == 401 {
                    self.auth.forget();
                }
                Error::Unavailable(format!("{} refused the credentials ({detail}): {}", self.server, self.auth.hint()))
            }
            // GCS says which is missing only in words.
            404 if message.is_some_and(|m| m.contains("bucket") && !m.contains("object")) => self.no_bucket(),
            404 => Error::NotFound,
            408 | 429 | 500..=599 => Error::Unavailable(format!("{what}: {detail}")),
            _ => Error::Broken(format!("{what}: unexpected {detail}")),
        }
    }
}

/// The configured endpoint, checked, or Google's.
fn endpoint(given: Option<String>) -> Result<Url, Error> {
    let text = given.unwrap_or_else(|| DEFAULT_ENDPOINT.into());
    let bad = |why: &str| {
        Error::InvalidConfig(format!(
            "endpoint={text}: {why}: expected a URL such as https://storage.googleapis.com or http://127.0.0.1:4443"
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
        return Err(bad("credentials do not belong in the URL (see key-env and token-env)"));
    }
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return Err(bad("give the API's root, without a path"));
    }
    Ok(url)
}

/// An object name as one path segment: everything but unreserved
/// characters percent-encoded, `/` included, as the JSON API wants.
fn escape(name: &str) -> String {
    let mut out = String::with_capacity(name.len() * 3);
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

export_backend!(Gcs);

#[cfg(test)]
mod tests {
    use super::*;

    fn open(pairs: &[(&str, &str)]) -> Result<Gcs, Error> {
        let pairs = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Gcs::open(Config::new(pairs)).map(|(g, _)| g)
    }

    #[test]
    fn objects_and_uploads_are_addressed_as_the_json_api_wants() {
        let gcs = open(&[("bucket", "acme-cache"), ("credentials", "none"), ("prefix", "team a/gocp/")]).unwrap();
        let name = gcs.name("ac", &[0xab; 32]);
        assert_eq!(name, format!("team a/gocp/ac/{}", "ab".repeat(32)));
        assert_eq!(
            gcs.object_url(&name, "alt=media").as_str(),
            format!(
                "https://storage.googleapis.com/storage/v1/b/acme-cache/o/team%20a%2Fgocp%2Fac%2F{}?alt=media",
                "ab".repeat(32)
            )
        );
        assert_eq!(
            gcs.upload_url("p/cas/x", "resumable").as_str(),
            "https://storage.googleapis.com/upload/storage/v1/b/acme-cache/o?uploadType=resumable&name=p%2Fcas%2Fx"
        );
        assert_eq!(gcs.server, "gcs at storage.googleapis.com");
        assert_eq!(CHUNK % (256 << 10), 0, "chunks but the last are multiples of 256 KiB");
    }

    #[test]
    fn configuration_mistakes_say_what_to_change() {
        let err = |pairs: &[(&str, &str)]| match open(pairs) {
            Err(Error::InvalidConfig(m)) => m,
            other => panic!("{:?}", other.err()),
        };
        assert!(err(&[]).contains("--config bucket="));
        assert!(err(&[("bucket", "b")]).contains("a bucket name has 3 to 222 characters"));
        assert!(err(&[("bucket", "acme")]).contains("key-env=VAR"), "no credentials named");
        assert!(err(&[("bucket", "acme"), ("credentials", "none"), ("token-env", "T")]).contains("give one of"));
        assert!(
            err(&[("bucket", "acme"), ("credentials", "none"), ("endpoint", "http://h:1/api")])
                .contains("without a path")
        );
        assert!(err(&[("bucket", "acme"), ("credentials", "none"), ("prefix", "/x")]).contains("no leading /"));
        let unset = err(&[("bucket", "acme"), ("token-env", "GOCP_TEST_SURELY_UNSET")]);
        assert!(unset.contains("grant it with --allow-env GOCP_TEST_SURELY_UNSET"), "{unset}");
        assert!(err(&[("bucket", "acme"), ("credentials", "none"), ("region", "x")]).contains("unknown"));
    }
}
