//! Where the gcs plugin's bearer token comes from: a variable holding an
//! access token, a service-account key whose signed JWT assertion is
//! exchanged for one at the key's `token_uri` (RFC 7523), or nothing, for a
//! bucket anyone may read.
//!
//! It owns the key (parsed once, in `open`, so a malformed key stops gocp
//! before it serves anything), the token's life (fetched on the first call
//! that needs it, renewed before it expires, dropped when Google refuses
//! it) and the words for a refused credential. It must never put a secret
//! in a message, nor exchange anything from `open`.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use gocp_http_client::{Body, Client, Method};
use gocp_plugin_sdk::{Config, Error};
use rsa::RsaPrivateKey;
use rsa::pkcs1v15::SigningKey;
use rsa::pkcs8::DecodePrivateKey;
use rsa::signature::{RandomizedSigner, SignatureEncoding};
use serde_json::{Value, json};
use sha2::Sha256;
use url::Url;

/// What the token may do: read and write objects, nothing else.
const SCOPE: &str = "https://www.googleapis.com/auth/devstorage.read_write";
const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
const DEFAULT_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
/// How long an assertion asks its token to live: Google's maximum.
const ASSERTION_LIFETIME: u64 = 3600;
/// A token is renewed this long before it expires, so that none expires
/// between the check and the request, nor on a clock a little off.
const RENEW_MARGIN: Duration = Duration::from_secs(300);
/// More than any token answer or error document Google sends.
const MAX_TOKEN_ANSWER: usize = 64 << 10;

pub enum Auth {
    /// `credentials=none`: requests go without a token.
    Anonymous,
    /// A token someone else obtained (gcloud, a CI's workload identity).
    Token {
        var: String,
        token: String,
    },
    Key(Box<ServiceAccount>),
}

pub struct ServiceAccount {
    email: String,
    key_id: Option<String>,
    signer: SigningKey<Sha256>,
    token_uri: Url,
    /// Where the key came from, as a refusal names it.
    source: String,
    /// The token in use and when to renew it.
    token: Option<(String, Instant)>,
}

impl Auth {
    /// The credentials the configuration names (`token-env`, `key-env` or
    /// `credentials=none`, exactly one), read from granted variables.
    pub fn from_config(config: &mut Config) -> Result<Auth, Error> {
        let none = match config.take("credentials").as_deref() {
            None => false,
            Some("none") => true,
            Some(v) => return Err(Error::InvalidConfig(format!("credentials={v}: the only value is none"))),
        };
        let token_var = config.take("token-env");
        let key_var = config.take("key-env");
        match (none, token_var, key_var) {
            (true, None, None) => Ok(Auth::Anonymous),
            (false, Some(var), None) => {
                let token = env(&var, "token-env")?;
                if !token.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(Error::InvalidConfig(format!(
                        "token-env={var}: {var} holds characters no access token has (only printable ASCII without spaces)"
                    )));
                }
                Ok(Auth::Token { var, token })
            }
            (false, None, Some(var)) => Ok(Auth::Key(Box::new(ServiceAccount::from_var(&var)?))),
            (false, None, None) => Err(Error::InvalidConfig(
                "gcs needs credentials: key-env=VAR (a service-account key, or its file's path, in VAR), \
                 token-env=VAR (an access token in VAR), each granted with --allow-env VAR, \
                 or credentials=none for a bucket anyone may read"
                    .into(),
            )),
            _ => Err(Error::InvalidConfig("give one of key-env, token-env and credentials=none".into())),
        }
    }

    /// The token to send, fetching or renewing it when that is due.
    pub fn bearer(&mut self, client: &Client) -> Result<Option<String>, Error> {
        match self {
            Auth::Anonymous => Ok(None),
            Auth::Token { token, .. } => Ok(Some(token.clone())),
            Auth::Key(account) => account.bearer(client).map(Some),
        }
    }

    /// The server refused the token: a key gets a new one at the next call
    /// (it may have been revoked); a given token cannot be renewed here.
    pub fn forget(&mut self) {
        if let Auth::Key(account) = self {
            account.token = None;
        }
    }

    /// What to check when the server refuses the credentials.
    pub fn hint(&self) -> String {
        match self {
            Auth::Anonymous => "the bucket is read without credentials (credentials=none): it must allow allUsers \
                                to read objects (and this build should run with --read-only)"
                .into(),
            Auth::Token { var, .. } => format!(
                "check the access token in {var} (it lasts an hour: renew it with `gcloud auth print-access-token` or your CI's auth step) \
                 and that its account may read and write objects in the bucket (roles/storage.objectUser)"
            ),
            Auth::Key(account) => format!(
                "check that the service account {} (key from {}) may read and write objects in the bucket (roles/storage.objectUser)",
                account.email, account.source
            ),
        }
    }
}

impl ServiceAccount {
    /// The key from the variable `var`: the JSON itself, or the path of a
    /// file holding it (what GOOGLE_APPLICATION_CREDENTIALS holds), which
    /// the plugin must have been granted.
    fn from_var(var: &str) -> Result<ServiceAccount, Error> {
        let value = env(var, "key-env")?;
        let (json, source) = if value.trim_start().starts_with('{') {
            (value, var.to_string())
        } else {
            let path = value.trim();
            let text = std::fs::read_to_string(path).map_err(|e| {
                Error::InvalidConfig(format!(
                    "key-env={var}: {var} names the key file {path}, which gcs cannot read ({e}): \
                     grant its directory with --allow-dir DIR:ro, or put the key's JSON itself in {var}"
                ))
            })?;
            (text, format!("{path} (named by {var})"))
        };
        ServiceAccount::parse(&json, &source)
    }

    /// Parses a key file's JSON; `source` says where it came from in messages.
    fn parse(json: &str, source: &str) -> Result<ServiceAccount, Error> {
        let bad = |why: &str| Error::InvalidConfig(format!("the key in {source} {why}"));
        let doc: Value = serde_json::from_str(json).map_err(|_| bad("is not JSON (a service-account key file is)"))?;
        match doc["type"].as_str() {
            Some("service_account") => {}
            Some(other @ ("external_account" | "authorized_user" | "impersonated_service_account")) => {
                return Err(bad(&format!(
                    "is an {other} credential, which gcs cannot exchange: give it an access token instead \
                     (token-env=VAR, with VAR from `gcloud auth print-access-token` or your CI's auth step, \
                     e.g. google-github-actions/auth with token_format: access_token)"
                )));
            }
            _ => return Err(bad("is not a service-account key (its \"type\" is not \"service_account\")")),
        }
        let field = |name: &str| doc[name].as_str().filter(|s| !s.is_empty());
        let email = field("client_email").ok_or_else(|| bad("has no client_email"))?.to_string();
        let pem = field("private_key").ok_or_else(|| bad("has no private_key"))?;
        let key = RsaPrivateKey::from_pkcs8_pem(pem)
            .map_err(|_| bad("has a private_key that is not an RSA key in PKCS#8 PEM"))?;
        let token_uri = field("token_uri").unwrap_or(DEFAULT_TOKEN_URI);
        let token_uri = Url::parse(token_uri)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some())
            .ok_or_else(|| bad(&format!("has a token_uri that is not an http(s) URL: {token_uri}")))?;
        Ok(ServiceAccount {
            email,
            key_id: field("private_key_id").map(str::to_string),
            signer: SigningKey::new(key),
            token_uri,
            source: source.to_string(),
            token: None,
        })
    }

    fn bearer(&mut self, client: &Client) -> Result<String, Error> {
        if let Some((token, renew_at)) = &self.token
            && Instant::now() < *renew_at
        {
            return Ok(token.clone());
        }
        let (token, lifetime) = self.exchange(client)?;
        self.token = Some((token.clone(), Instant::now() + lifetime.saturating_sub(RENEW_MARGIN)));
        Ok(token)
    }

    /// The signed JWT asking for a token for this account, valid from now.
    fn assertion(&self, now: u64) -> String {
        let mut header = json!({ "alg": "RS256", "typ": "JWT" });
        if let Some(id) = &self.key_id {
            header["kid"] = json!(id);
        }
        let claims = json!({
            "iss": self.email,
            "scope": SCOPE,
            "aud": self.token_uri.as_str(),
            "iat": now,
            "exp": now + ASSERTION_LIFETIME,
        });
        let signed =
            format!("{}.{}", URL_SAFE_NO_PAD.encode(header.to_string()), URL_SAFE_NO_PAD.encode(claims.to_string()));
        let signature = self.signer.sign_with_rng(&mut rand_core::OsRng, signed.as_bytes());
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature.to_bytes()))
    }

    /// Trades a fresh assertion for an access token and its lifetime.
    fn exchange(&self, client: &Client) -> Result<(String, Duration), Error> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let form = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", GRANT_TYPE)
            .append_pair("assertion", &self.assertion(now))
            .finish();
        let endpoint = &self.token_uri[url::Position::BeforeHost..url::Position::AfterPath];
        let what = format!("gcs token endpoint {endpoint}");
        let headers = [("content-type", "application/x-www-form-urlencoded".to_string())];
        let response =
            client.send_with(Method::Post, &self.token_uri, &headers, Body::Bytes(form.as_bytes()), &what)?;
        let doc: Value = serde_json::from_slice(&response.bytes(MAX_TOKEN_ANSWER)?).unwrap_or(Value::Null);
        let detail = || match (doc["error"].as_str(), doc["error_description"].as_str()) {
            (Some(e), Some(d)) => format!("HTTP {} {e}: {d}", response.status),
            (Some(e), None) => format!("HTTP {} {e}", response.status),
            _ => format!("HTTP {}", response.status),
        };
        match response.status {
            200 => {}
            400 | 401 | 403 => {
                return Err(Error::Unavailable(format!(
                    "{what} refused the credentials ({}): check that the key from {} is current (not deleted or disabled) \
                     and that this machine's clock is right",
                    detail(),
                    self.source
                )));
            }
            408 | 429 | 500..=599 => return Err(Error::Unavailable(format!("{what}: {}", detail()))),
            _ => return Err(Error::Broken(format!("{what}: unexpected {}", detail()))),
        }
        let token = doc["access_token"]
            .as_str()
            .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_graphic()))
            .ok_or_else(|| Error::Broken(format!("{what}: the answer holds no usable access_token")))?;
        // Google's tokens last an hour; an answer without a lifetime gets
        // as long as the assertion asked for.
        let lifetime = doc["expires_in"].as_u64().unwrap_or(ASSERTION_LIFETIME);
        Ok((token.to_string(), Duration::from_secs(lifetime)))
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

#[cfg(test)]
mod tests {
    use super::*;
    use rsa::RsaPublicKey;
    use rsa::pkcs1v15::{Signature, VerifyingKey};
    use rsa::pkcs8::{EncodePrivateKey, LineEnding};
    use rsa::signature::Verifier;

    fn key_json(pem: &str, extra: Value) -> String {
        let mut doc = json!({
            "type": "service_account",
            "client_email": "cache@project.iam.gserviceaccount.com",
            "private_key_id": "k1",
            "private_key": pem,
            "token_uri": "https://oauth2.example.test/token",
        });
        for (k, v) in extra.as_object().unwrap() {
            doc[k] = v.clone();
        }
        doc.to_string()
    }

    #[test]
    fn the_assertion_is_a_jwt_the_accounts_public_key_verifies() {
        let key = RsaPrivateKey::new(&mut rand_core::OsRng, 1024).unwrap();
        let pem = key.to_pkcs8_pem(LineEnding::LF).unwrap();
        let account = ServiceAccount::parse(&key_json(&pem, json!({})), "TEST_VAR").unwrap();
        let jwt = account.assertion(1_700_000_000);
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3, "{jwt}");
        let decode = |p: &str| -> Value { serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).unwrap()).unwrap() };
        assert_eq!(decode(parts[0]), json!({ "alg": "RS256", "typ": "JWT", "kid": "k1" }));
        assert_eq!(
            decode(parts[1]),
            json!({
                "iss": "cache@project.iam.gserviceaccount.com",
                "scope": SCOPE,
                "aud": "https://oauth2.example.test/token",
                "iat": 1_700_000_000u64,
                "exp": 1_700_003_600u64,
            })
        );
        let signature = Signature::try_from(URL_SAFE_NO_PAD.decode(parts[2]).unwrap().as_slice()).unwrap();
        let verifier = VerifyingKey::<Sha256>::new(RsaPublicKey::from(&key));
        let signed = format!("{}.{}", parts[0], parts[1]);
        assert!(verifier.verify(signed.as_bytes(), &signature).is_ok(), "RS256 over header.claims");
    }

    #[test]
    fn keys_gcs_cannot_use_are_named_without_their_secrets() {
        let bad = |json: &str| match ServiceAccount::parse(json, "K") {
            Err(Error::InvalidConfig(m)) => m,
            Err(e) => panic!("{e:?}"),
            Ok(_) => panic!("accepted {json}"),
        };
        assert!(bad("not json").contains("not JSON"));
        let federated = bad(&json!({ "type": "external_account", "audience": "x" }).to_string());
        assert!(federated.contains("token-env"), "{federated}");
        let broken =
            bad(&key_json("-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWJ5dGVz\n-----END PRIVATE KEY-----\n", json!({})));
        assert!(broken.contains("not an RSA key") && !broken.contains("c2VjcmV0"), "{broken}");
        let key = RsaPrivateKey::new(&mut rand_core::OsRng, 1024).unwrap();
        let pem = key.to_pkcs8_pem(LineEnding::LF).unwrap();
        assert!(bad(&key_json(&pem, json!({ "token_uri": "ftp://x/token" }))).contains("token_uri"));
        assert!(bad(&key_json(&pem, json!({ "client_email": "" }))).contains("client_email"));
        let account = ServiceAccount::parse(&key_json(&pem, json!({ "token_uri": null })), "K").unwrap();
        assert_eq!(account.token_uri.as_str(), DEFAULT_TOKEN_URI, "Google's endpoint when the key names none");
    }
}
