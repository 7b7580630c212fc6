//! `azure`: keeps gocp's entries and bodies as block blobs in an Azure Blob
//! Storage container, so machines that share the container share their Go
//! build cache.
//!
//! Layout: `<prefix>ac/<action id hex>` holds an entry line (the SDK's
//! [`Entry::to_line`], host data included) and `<prefix>cas/<output id hex>`
//! the raw body. A body of up to 16 MiB goes up with one Put Blob; a larger
//! one as 16 MiB blocks (Put Block) committed by one Put Block List. Bodies
//! stream both ways straight between the host and the connection, so none is
//! ever held here. Requests are signed with the account key (Shared Key,
//! HMAC-SHA256 over each request), carry a SAS token, or go anonymous to a
//! container anyone may read.
//!
//! This module owns the configuration, the layout, the signatures and the
//! meaning of the service's answers. It must never contact the service from
//! `open` (every go command pays for start-up; a wrong key or container shows
//! at the first call), never read a secret from a configuration value, and
//! never hold a whole body.

use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use gocp_http_client::{Body, Client, Method, Response};
use gocp_plugin_sdk::SEND_WITHOUT_ASKING;
use gocp_plugin_sdk::{
    Backend, Capabilities, Config, ConfigKey, Digest, Entry, Error, Info, InputStream, MAX_ENTRY_LINE, OutputStream,
    export_backend, hex,
};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use url::Url;

const DEFAULT_PREFIX: &str = "gocp/";
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// The REST API version every request asks for: the oldest one that takes
/// single-request blobs of up to 5000 MiB, which Azurite serves too.
const API_VERSION: &str = "2021-12-02";
/// Bodies larger than this go up as blocks of this size.
const BLOCK: u64 = 16 << 20;
/// How much of an error document is read for its message.
const MAX_ERROR_BYTES: usize = 16 << 10;
/// Blob names are at most 1024 characters; `cas/` and 64 hex digits follow the prefix.
const MAX_PREFIX: usize = 1024 - 68;

enum Auth {
    /// `credentials=none`: a container that allows anonymous reads.
    Anonymous,
    /// Shared Key: the account key, decoded, and the variable it came from.
    Key { key: Vec<u8>, var: String },
    /// A SAS token's query string, and the variable it came from.
    Sas { query: String, var: String },
}

struct Azure {
    client: Client,
    account: String,
    /// The container's URL, ending in `/`: blob names go after it.
    container_url: Url,
    container: String,
    prefix: String,
    auth: Auth,
    /// "azure at HOST[:PORT]", how messages name the service.
    server: String,
}

impl Backend for Azure {
    fn describe() -> Info {
        let key = |name: &str, help: &str| ConfigKey { name: name.into(), help: help.into() };
        Info {
            name: "azure".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            summary: "entries and bodies as block blobs in an Azure Blob Storage container, shared by every machine that uses it".into(),
            max_instances: 0,
            config_keys: vec![
                key("account", "the storage account's name (required)"),
                key("container", "the container to use (required; it must exist: gocp never creates one)"),
                key("key-env", "a variable holding the account's access key (Shared Key), granted with --allow-env"),
                key("sas-env", "a variable holding a SAS token with read, create and write permissions, granted with --allow-env"),
                key("credentials", "none: send requests unsigned, to read a container that allows anonymous reads"),
                key(
                    "prefix",
                    "prepended to every blob name, to keep teams or projects apart and to clean up one of them; \
                     Go's action ids already cover the Go version and inputs, so sharing a prefix is safe (default gocp/)",
                ),
                key(
                    "endpoint",
                    "the account's blob service URL, e.g. http://127.0.0.1:10000/devstoreaccount1 for Azurite \
                     (default https://<account>.blob.core.windows.net)",
                ),
                key("timeout", "how long to wait to connect and for each reply (default 5s)"),
            ],
        }
    }

    fn open(mut config: Config) -> Result<(Self, Capabilities), Error> {
        let account = config
            .take("account")
            .ok_or_else(|| Error::InvalidConfig("azure needs the storage account: add --config account=NAME".into()))?;
        if account.is_empty() || !account.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()) {
            return Err(Error::InvalidConfig(format!(
                "account={account}: a storage account's name holds only a-z and 0-9"
            )));
        }
        let container = config.take("container").ok_or_else(|| {
            Error::InvalidConfig("azure needs a container: add --config container=NAME (an existing container)".into())
        })?;
        let valid_container = (3..=63).contains(&container.len())
            && container.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !container.starts_with('-')
            && !container.ends_with('-')
            && !container.contains("--");
        if !valid_container {
            return Err(Error::InvalidConfig(format!(
                "container={container}: a container name has 3 to 63 characters, a-z, 0-9 and single '-' between them"
            )));
        }
        let endpoint = endpoint(config.take("endpoint"), &account)?;
        let prefix = config.take("prefix").unwrap_or_else(|| DEFAULT_PREFIX.into());
        if prefix.starts_with('/') || prefix.chars().any(char::is_control) || prefix.len() > MAX_PREFIX {
            return Err(Error::InvalidConfig(format!(
                "prefix={prefix:?}: a blob name prefix such as team-a/gocp/ (no leading /, no control characters, \
                 at most {MAX_PREFIX} bytes)"
            )));
        }
        let timeout = config.take_duration("timeout", DEFAULT_TIMEOUT)?;
        if timeout.is_zero() {
            return Err(Error::InvalidConfig("timeout=0: give a duration such as 5s".into()));
        }
        let auth = auth(&mut config)?;
        config.finish()?;

        let container_url = Url::parse(&format!("{}/{container}/", endpoint.as_str().trim_end_matches('/')))
            .map_err(|e| Error::InvalidConfig(format!("endpoint={endpoint} with container={container}: {e}")))?;
        let server = format!("azure at {}", &endpoint[url::Position::BeforeHost..url::Position::AfterPort]);
        let azure = Azure { client: Client::new(timeout), account, container_url, container, prefix, auth, server };
        Ok((azure, Capabilities { stores_bodies: true }))
    }

    fn read_entry(&mut self, action_id: &Digest) -> Result<Entry, Error> {
        let name = self.name("ac", action_id);
        let what = self.what("GET", &name);
        let response = self.send(Method::Get, &name, &[], &[], Body::Empty, &what)?;
        if response.status != 200 {
            return Err(self.refusal(&response, &what));
        }
        let text = response.bytes(MAX_ENTRY_LINE + 1)?;
        std::str::from_utf8(&text).ok().filter(|_| text.len() <= MAX_ENTRY_LINE).and_then(Entry::parse).ok_or_else(
            || {
                Error::Broken(format!(
                    "{what}: not an entry gocp wrote ({} bytes): delete the blob or use another prefix",
                    text.len()
                ))
            },
        )
    }

    fn read_body(&mut self, output_id: &Digest, size: u64, sink: &OutputStream) -> Result<(), Error> {
        let name = self.name("cas", output_id);
        let what = self.what("GET", &name);
        let response = self.send(Method::Get, &name, &[], &[], Body::Empty, &what)?;
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
            let what = self.what("HEAD", &name);
            let head = self.send(Method::Head, &name, &[], &[], Body::Empty, &what)?;
            match head.status {
                200 if head.content_length == Some(size) => return Ok(()),
                200 => {}
                404 if head.header("x-ms-error-code") != Some("ContainerNotFound") => {}
                _ => return Err(self.refusal(&head, &what)),
            }
        }
        if size <= BLOCK {
            return self.put_blob(&name, Body::Stream { from: body, size });
        }
        // Block ids are the block's index, the same for every writer of
        // this blob: two machines uploading the same output at once send
        // identical blocks under identical ids, so either commit is whole.
        let what = self.what("PUT", &name);
        let mut ids = Vec::new();
        let mut sent = 0;
        while sent < size {
            let n = BLOCK.min(size - sent);
            let id = BASE64.encode(format!("{:08}", ids.len()));
            let query = [("comp", "block"), ("blockid", id.as_str())];
            let response = self.send(Method::Put, &name, &query, &[], Body::Stream { from: body, size: n }, &what)?;
            if response.status != 201 {
                return Err(self.refusal(&response, &what));
            }
            ids.push(id);
            sent += n;
        }
        let mut list = String::from("<?xml version=\"1.0\" encoding=\"utf-8\"?><BlockList>");
        for id in &ids {
            list.push_str(&format!("<Latest>{id}</Latest>"));
        }
        list.push_str("</BlockList>");
        let response =
            self.send(Method::Put, &name, &[("comp", "blocklist")], &[], Body::Bytes(list.as_bytes()), &what)?;
        match response.status {
            201 => Ok(()),
            _ => Err(self.refusal(&response, &what)),
        }
    }

    fn write_entry(&mut self, action_id: &Digest, entry: Entry) -> Result<(), Error> {
        let name = self.name("ac", action_id);
        self.put_blob(&name, Body::Bytes(entry.to_line().as_bytes()))
    }
}

impl Azure {
    fn name(&self, kind: &str, id: &Digest) -> String {
        format!("{}{kind}/{}", self.prefix, hex(id))
    }

    fn what(&self, method: &str, name: &str) -> String {
        format!("{}: {method} {}/{name}", self.server, self.container)
    }

    fn put_blob(&self, name: &str, body: Body<'_>) -> Result<(), Error> {
        let what = self.what("PUT", name);
        let headers = [("x-ms-blob-type", "BlockBlob".to_string())];
        let response = self.send(Method::Put, name, &[], &headers, body, &what)?;
        match response.status {
            201 => Ok(()),
            _ => Err(self.refusal(&response, &what)),
        }
    }

    /// Sends one request for the blob `name` with the operation's `query`
    /// and `headers`, authorised as configured.
    fn send(
        &self,
        method: Method,
        name: &str,
        query: &[(&str, &str)],
        headers: &[(&str, String)],
        body: Body<'_>,
        what: &str,
    ) -> Result<Response, Error> {
        let mut url = self.container_url.clone();
        url.set_path(&format!("{}{}", self.container_url.path(), escape(name)));
        let mut pairs = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in query {
            pairs.append_pair(k, v);
        }
        let mut query_string = pairs.finish();
        if let Auth::Sas { query: sas, .. } = &self.auth {
            if !query_string.is_empty() {
                query_string.push('&');
            }
            query_string.push_str(sas);
        }
        url.set_query(Some(&query_string).filter(|q| !q.is_empty()).map(String::as_str));

        let mut all: Vec<(&str, String)> = headers.to_vec();
        all.push(("x-ms-date", httpdate::fmt_http_date(SystemTime::now())));
        all.push(("x-ms-version", API_VERSION.to_string()));
        if let Auth::Key { key, .. } = &self.auth {
            let length = match &body {
                Body::Empty => 0,
                Body::Bytes(b) => b.len() as u64,
                Body::Stream { size, .. } => *size,
            };
            let signature = sign(key, &string_to_sign(method_name(&method), length, &all, &self.account, &url));
            all.push(("authorization", format!("SharedKey {}:{signature}", self.account)));
        }
        self.client.send_with(method, &url, &all, body, what)
    }

    /// The error for an answer that is not a success, from its error code
    /// (a header, so HEAD answers have one too) and its message.
    fn refusal(&self, response: &Response, what: &str) -> Error {
        let code = response.header("x-ms-error-code").map(str::to_string);
        let document = String::from_utf8_lossy(&response.bytes(MAX_ERROR_BYTES).unwrap_or_default()).into_owned();
        // Azure's messages go on with a request id and a time, line by line.
        let message = xml_field(&document, "Message").and_then(|m| m.lines().next()).map(str::to_string);
        let status = response.status;
        let detail = match (&code, &message) {
            (Some(c), Some(m)) => format!("HTTP {status} {c}: {m}"),
            (Some(c), None) => format!("HTTP {status} {c}"),
            _ => format!("HTTP {status}"),
        };
        match (status, code.as_deref()) {
            (404, Some("ContainerNotFound")) => Error::Unavailable(format!(
                "{}: container {} does not exist: create it or change --config container=",
                self.server, self.container
            )),
            (404, _) => Error::NotFound,
            // The code says it all; Azure's message for it is long and general.
            (401 | 403, _) | (400, Some("InvalidAuthenticationInfo" | "AuthenticationFailed")) => {
                let code = code.map(|c| format!(" {c}")).unwrap_or_default();
                Error::Unavailable(format!(
                    "{} refused the credentials (HTTP {status}{code}): {}",
                    self.server,
                    self.hint()
                ))
            }
            (408 | 429 | 500..=599, _) => Error::Unavailable(format!("{what}: {detail}")),
            _ => Error::Broken(format!("{what}: unexpected {detail}")),
        }
    }

    /// What to check when the service refuses the credentials.
    fn hint(&self) -> String {
        match &self.auth {
            Auth::Anonymous => format!(
                "container {} is read without credentials (credentials=none): it must allow anonymous reads of blobs \
                 (and this build should run with --read-only)",
                self.container
            ),
            Auth::Key { var, .. } => format!(
                "check that the key in {var} is a current access key of storage account {} (and this machine's clock is right)",
                self.account
            ),
            Auth::Sas { var, .. } => format!(
                "check that the SAS in {var} is for account {} and container {}, has not expired, and allows read, \
                 create and write (sp=rcw)",
                self.account, self.container
            ),
        }
    }
}

/// The credentials the configuration names (`key-env`, `sas-env` or
/// `credentials=none`, exactly one), read from granted variables.
fn auth(config: &mut Config) -> Result<Auth, Error> {
    let none = match config.take("credentials").as_deref() {
        None => false,
        Some("none") => true,
        Some(v) => return Err(Error::InvalidConfig(format!("credentials={v}: the only value is none"))),
    };
    match (none, config.take("key-env"), config.take("sas-env")) {
        (true, None, None) => Ok(Auth::Anonymous),
        (false, Some(var), None) => {
            let value = env(&var, "key-env")?;
            let key = BASE64.decode(value.trim()).ok().filter(|k| !k.is_empty()).ok_or_else(|| {
                Error::InvalidConfig(format!(
                    "key-env={var}: {var} does not hold an account key (base64, as the portal and `az storage account keys list` show it)"
                ))
            })?;
            Ok(Auth::Key { key, var })
        }
        (false, None, Some(var)) => {
            let value = env(&var, "sas-env")?;
            let query = value.trim().trim_start_matches('?').to_string();
            let is_sas = url::form_urlencoded::parse(query.as_bytes()).any(|(k, _)| k == "sig")
                && query.bytes().all(|b| b.is_ascii_graphic() && b != b'#');
            if !is_sas {
                return Err(Error::InvalidConfig(format!(
                    "sas-env={var}: {var} does not hold a SAS token (a query string such as sv=...&sp=rcw&sig=...)"
                )));
            }
            Ok(Auth::Sas { query, var })
        }
        (false, None, None) => Err(Error::InvalidConfig(
            "azure needs credentials: key-env=VAR (the account key in VAR), sas-env=VAR (a SAS token in VAR), \
             each granted with --allow-env VAR, or credentials=none for a container anyone may read"
                .into(),
        )),
        _ => Err(Error::InvalidConfig("give one of key-env, sas-env and credentials=none".into())),
    }
}

/// A granted variable's value; unset and empty are the same to a user.
fn env(var: &str, key: &str) -> Result<String, Error> {
    std::env::var(var).ok().filter(|v| !v.trim().is_empty()).ok_or_else(|| {
        Error::InvalidConfig(format!(
            "{key}={var}: {var} is not set or empty: set {var} and grant it with --allow-env {var}"
        ))
    })
}

/// The configured endpoint, checked, or the account's in Azure's cloud.
fn endpoint(given: Option<String>, account: &str) -> Result<Url, Error> {
    let text = given.unwrap_or_else(|| format!("https://{account}.blob.core.windows.net"));
    let bad = |why: &str| {
        Error::InvalidConfig(format!(
            "endpoint={text}: {why}: expected a URL such as https://{account}.blob.core.windows.net \
             or http://127.0.0.1:10000/{account}"
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
        return Err(bad("credentials do not belong in the URL (see key-env and sas-env)"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(bad("no ?query or #fragment (a SAS token goes in a variable named by sas-env)"));
    }
    Ok(url)
}

/// The Shared Key string to sign for a request (REST API versions since
/// 2015-02-21): the verb, the standard headers gocp sends (only
/// Content-Length; the others are empty lines), the `x-ms-` headers and the
/// resource with its query.
fn string_to_sign(verb: &str, length: u64, headers: &[(&str, String)], account: &str, url: &Url) -> String {
    let length = if length == 0 { String::new() } else { length.to_string() };
    let mut out = format!("{verb}\n\n\n{length}\n\n\n\n\n\n\n\n\n");
    let mut ms: Vec<(String, &str)> = headers
        .iter()
        .filter(|(n, _)| n.to_ascii_lowercase().starts_with("x-ms-"))
        .map(|(n, v)| (n.to_ascii_lowercase(), v.trim()))
        .collect();
    ms.sort();
    for (name, value) in ms {
        out.push_str(&format!("{name}:{value}\n"));
    }
    out.push_str(&format!("/{account}{}", url.path()));
    let mut params: Vec<(String, String)> =
        url.query_pairs().map(|(k, v)| (k.to_ascii_lowercase(), v.into_owned())).collect();
    params.sort();
    for (name, value) in params {
        out.push_str(&format!("\n{name}:{value}"));
    }
    out
}

fn sign(key: &[u8], text: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(text.as_bytes());
    BASE64.encode(mac.finalize().into_bytes())
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

/// A blob name in a URL path: `/` kept (Azure's virtual directories), every
/// other byte but unreserved characters percent-encoded.
fn escape(name: &str) -> String {
    let mut out = String::with_capacity(name.len() * 3);
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The text of the first `<name>` element of an error document: flat and
/// small, so two fields do not justify an XML parser.
fn xml_field<'a>(document: &'a str, name: &str) -> Option<&'a str> {
    let start = document.find(&format!("<{name}>"))? + name.len() + 2;
    let len = document[start..].find(&format!("</{name}>"))?;
    Some(document[start..start + len].trim()).filter(|s| !s.is_empty())
}

export_backend!(Azure);

#[cfg(test)]
mod tests {
    use super::*;

    fn open(pairs: &[(&str, &str)]) -> Result<Azure, Error> {
        let pairs = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Azure::open(Config::new(pairs)).map(|(a, _)| a)
    }

    /// The string follows the layout Azure documents for Shared Key (an
    /// Azurite account's path appears twice: once as the account, once in
    /// the URL); the HMAC is RFC 4231's, as openssl computes it.
    #[test]
    fn shared_key_strings_follow_the_documented_layout() {
        let url = Url::parse("http://127.0.0.1:10000/devstoreaccount1/c/gocp/cas/ab?comp=block&blockid=MDAwMDAwMDA%3D")
            .unwrap();
        let headers = [
            ("x-ms-version", API_VERSION.to_string()),
            ("X-Ms-Date", "Sun, 29 Nov 2026 10:00:00 GMT".to_string()),
            ("content-type", "ignored".to_string()),
        ];
        let text = string_to_sign("PUT", 5, &headers, "devstoreaccount1", &url);
        assert_eq!(
            text,
            "PUT\n\n\n5\n\n\n\n\n\n\n\n\n\
             x-ms-date:Sun, 29 Nov 2026 10:00:00 GMT\nx-ms-version:2021-12-02\n\
             /devstoreaccount1/devstoreaccount1/c/gocp/cas/ab\nblockid:MDAwMDAwMDA=\ncomp:block"
        );
        let get = string_to_sign("GET", 0, &[], "acct", &Url::parse("https://acct.blob.core.windows.net/c/x").unwrap());
        assert_eq!(get, "GET\n\n\n\n\n\n\n\n\n\n\n\n/acct/c/x", "no Content-Length line for an empty body");
        // echo -n 'The quick...' | openssl dgst -sha256 -mac HMAC -macopt key:key -binary | base64
        assert_eq!(
            sign(b"key", "The quick brown fox jumps over the lazy dog"),
            "97yD9DBThCSxMpjmqm+xQ+9NWaFJRhdZl0edvC0aPNg="
        );
    }

    #[test]
    fn blobs_are_addressed_under_the_container() {
        let azure = open(&[
            ("account", "devstoreaccount1"),
            ("container", "go-cache"),
            ("credentials", "none"),
            ("endpoint", "http://127.0.0.1:10000/devstoreaccount1"),
            ("prefix", "team a/"),
        ])
        .unwrap();
        assert_eq!(azure.container_url.as_str(), "http://127.0.0.1:10000/devstoreaccount1/go-cache/");
        assert_eq!(escape(&azure.name("ac", &[1; 32])), format!("team%20a/ac/{}", "01".repeat(32)));
        assert_eq!(azure.server, "azure at 127.0.0.1:10000");
        let cloud = open(&[("account", "acme"), ("container", "go-cache"), ("credentials", "none")]).unwrap();
        assert_eq!(cloud.container_url.as_str(), "https://acme.blob.core.windows.net/go-cache/");
    }

    #[test]
    fn configuration_mistakes_say_what_to_change() {
        let err = |pairs: &[(&str, &str)]| match open(pairs) {
            Err(Error::InvalidConfig(m)) => m,
            other => panic!("{:?}", other.err()),
        };
        let base = [("account", "acme"), ("container", "go-cache")];
        let with = |extra: &[(&'static str, &'static str)]| -> Vec<(&'static str, &'static str)> {
            base.iter().chain(extra).copied().collect()
        };
        assert!(err(&[]).contains("--config account="));
        assert!(err(&[("account", "Acme")]).contains("only a-z and 0-9"));
        assert!(err(&[("account", "acme")]).contains("--config container="));
        assert!(err(&[("account", "acme"), ("container", "a--b")]).contains("single '-'"));
        assert!(err(&with(&[])).contains("key-env=VAR"), "no credentials named");
        assert!(err(&with(&[("credentials", "none"), ("sas-env", "S")])).contains("give one of"));
        assert!(err(&with(&[("credentials", "none"), ("endpoint", "http://h/?sv=1")])).contains("sas-env"));
        let unset = err(&with(&[("key-env", "GOCP_TEST_SURELY_UNSET")]));
        assert!(unset.contains("grant it with --allow-env GOCP_TEST_SURELY_UNSET"), "{unset}");
        assert!(err(&with(&[("credentials", "none"), ("bucket", "x")])).contains("unknown"));
    }
}
