//! Whose entries a shared cache may feed a build: the key this machine signs
//! what it writes with, the keys it trusts, and `gocp-host keygen`.
//!
//! Anyone who can write to a shared store could map a real action to another
//! well-formed output, which every machine reading the store would then link
//! in. So a signer signs each entry it writes over what the go command will
//! trust (the action id, the output id, its size and time) and how its body
//! is stored, and a reader that trusts keys uses an entry only if one of them
//! signed exactly it. The signature travels in the entry's host data (see
//! `host_data`); plugins store it without knowing what it is.
//!
//! Each signer writes under a namespace of its own, the action id hashed with
//! its public key: a pull request signing with another key (or none) writes
//! elsewhere, and can neither replace nor hide the trusted builds' entries. A
//! reader looks where the keys it trusts write; a signer that names no trust
//! keys trusts its own. Without keys, entries go where they always did,
//! unsigned, and nothing is checked.
//!
//! It owns the key material, and must never let a private key reach a plugin:
//! only signatures and namespaced ids leave this module.

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use sha2::{Digest as _, Sha256};

use crate::domain::{Digest, Entry};
use crate::host_data::{self, Parsed};

const PUBLIC_PREFIX: &str = "gocp-ed25519:";
const PRIVATE_PREFIX: &str = "gocp-ed25519-private:";

/// A public key someone signs with: what `--trust-key` names.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PUBLIC_PREFIX}{}", BASE64.encode(self.0.as_bytes()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl PublicKey {
    /// A key as `gocp-ed25519:BASE64`.
    pub fn parse(text: &str) -> Result<PublicKey> {
        let b64 = text.trim().strip_prefix(PUBLIC_PREFIX).ok_or_else(|| {
            anyhow!("not a gocp public key (expected {PUBLIC_PREFIX}BASE64, as `gocp-host keygen` writes)")
        })?;
        let bytes: [u8; 32] = BASE64
            .decode(b64)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| anyhow!("{PUBLIC_PREFIX}... is not 32 bytes of base64"))?;
        VerifyingKey::from_bytes(&bytes).map(PublicKey).map_err(|_| anyhow!("not a valid Ed25519 public key"))
    }

    /// A `--trust-key` value: the key itself, or a file holding it.
    pub fn from_arg(arg: &str) -> Result<PublicKey> {
        if arg.trim().starts_with(PUBLIC_PREFIX) {
            return PublicKey::parse(arg).context("--trust-key");
        }
        let text = fs::read_to_string(arg).with_context(|| format!("--trust-key {arg}: reading it"))?;
        PublicKey::parse(&text).with_context(|| format!("--trust-key {arg}"))
    }

    /// Where this key's signer writes the entry of `action_id`.
    fn namespace(&self, action_id: &Digest) -> Digest {
        let mut h = Sha256::new();
        h.update(b"gocp signed namespace v1\0");
        h.update(self.0.as_bytes());
        h.update(action_id);
        h.finalize().into()
    }

    fn verifies(&self, action_id: &Digest, entry: &Entry, host_data: &Parsed<'_>) -> bool {
        let Some(signature) = &host_data.signature else { return false };
        let signature = Signature::from_bytes(signature);
        self.0.verify_strict(&message(action_id, entry, host_data.signed), &signature).is_ok()
    }
}

/// The key this machine signs with.
pub struct PrivateKey(SigningKey);

impl PrivateKey {
    fn parse(text: &str) -> Result<PrivateKey> {
        let b64 = text.trim().strip_prefix(PRIVATE_PREFIX).ok_or_else(|| {
            anyhow!("not a gocp signing key (expected {PRIVATE_PREFIX}BASE64, as `gocp-host keygen` writes)")
        })?;
        let seed: [u8; 32] = BASE64
            .decode(b64)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| anyhow!("{PRIVATE_PREFIX}... is not 32 bytes of base64"))?;
        Ok(PrivateKey(SigningKey::from_bytes(&seed)))
    }

    /// The key in a file only its owner can read, as ssh asks of its keys.
    pub fn from_file(path: &Path) -> Result<PrivateKey> {
        let meta = fs::metadata(path).with_context(|| format!("signing key {}", path.display()))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            bail!(
                "signing key {} can be read by others (mode {mode:03o}): run `chmod 600 {}`",
                path.display(),
                path.display()
            );
        }
        let text = fs::read_to_string(path).with_context(|| format!("signing key {}", path.display()))?;
        PrivateKey::parse(&text).with_context(|| format!("signing key {}", path.display()))
    }

    /// The key itself, from a CI secret in `GOCP_SIGN_KEY`.
    pub fn from_env_value(value: &str) -> Result<PrivateKey> {
        PrivateKey::parse(value).context("GOCP_SIGN_KEY")
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    /// The key as text, for comparing with what a plugin might be handed.
    pub fn secret_text(&self) -> String {
        format!("{PRIVATE_PREFIX}{}", BASE64.encode(self.0.to_bytes()))
    }
}

/// What a signature covers: everything the go command trusts an entry for,
/// and the host data's records before the signature (how the body is stored).
fn message(action_id: &Digest, entry: &Entry, records: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(22 + 32 + 32 + 16 + records.len());
    m.extend_from_slice(b"gocp signed entry v2\0");
    m.extend_from_slice(action_id);
    m.extend_from_slice(&entry.output_id);
    m.extend_from_slice(&entry.size.to_le_bytes());
    m.extend_from_slice(&entry.put_time_ns.to_le_bytes());
    m.extend_from_slice(records);
    m
}

/// The keys of one session.
#[derive(Default)]
pub struct Trust {
    signer: Option<PrivateKey>,
    trusted: Vec<PublicKey>,
}

/// Where to look an action up, and whose signature must be there.
pub struct Lookup<'a> {
    pub key: Digest,
    pub signer: Option<&'a PublicKey>,
}

impl Trust {
    /// Signing with `signer`, if any, and trusting `trusted` (or, when none
    /// are named, the signer's own key).
    pub fn new(signer: Option<PrivateKey>, mut trusted: Vec<PublicKey>) -> Trust {
        if trusted.is_empty()
            && let Some(s) = &signer
        {
            trusted.push(s.public());
        }
        Trust { signer, trusted }
    }

    /// Whether entries are signed or checked at all.
    pub fn in_use(&self) -> bool {
        self.signer.is_some() || !self.trusted.is_empty()
    }

    pub fn signs(&self) -> bool {
        self.signer.is_some()
    }

    /// Where to look for `action_id`, in order: under each trusted key's
    /// namespace, or, trusting no key, under the action id itself.
    pub fn lookups(&self, action_id: &Digest) -> Vec<Lookup<'_>> {
        if self.trusted.is_empty() {
            return vec![Lookup { key: *action_id, signer: None }];
        }
        self.trusted.iter().map(|k| Lookup { key: k.namespace(action_id), signer: Some(k) }).collect()
    }

    /// Whether an entry found by `lookup` may be used: unchecked without
    /// trust keys; else signed, by the key it was looked up for, over exactly
    /// this action and entry.
    pub fn accepts(&self, lookup: &Lookup<'_>, action_id: &Digest, entry: &Entry, host_data: &Parsed<'_>) -> bool {
        lookup.signer.is_none_or(|k| k.verifies(action_id, entry, host_data))
    }

    /// Where the entry of `action_id` is written, and its host data: the
    /// `records` given, then a signature when this machine signs.
    pub fn seal(&self, action_id: &Digest, entry: &Entry, mut records: Vec<u8>) -> (Digest, Vec<u8>) {
        match &self.signer {
            None => (*action_id, records),
            Some(s) => {
                let signature = s.0.sign(&message(action_id, entry, &records)).to_bytes();
                host_data::append_signature(&mut records, &signature);
                (s.public().namespace(action_id), records)
            }
        }
    }

    /// The signing key as text (see [`PrivateKey::secret_text`]).
    pub fn secret_text(&self) -> Option<String> {
        self.signer.as_ref().map(PrivateKey::secret_text)
    }
}

/// `gocp-host keygen --out DIR`: a new key pair, `DIR/signing.key` (mode
/// 0600, never overwritten) and `DIR/signing.pub`. Returns the public key.
pub fn keygen(dir: &Path) -> Result<PublicKey> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| anyhow!("reading randomness: {e}"))?;
    let key = PrivateKey(SigningKey::from_bytes(&seed));
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let private = dir.join("signing.key");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&private)
        .with_context(|| format!("writing {} (an existing key is never overwritten)", private.display()))?;
    file.write_all(format!("{}\n", key.secret_text()).as_bytes())?;
    let public = key.public();
    let public_path = dir.join("signing.pub");
    fs::write(&public_path, format!("{public}\n")).with_context(|| format!("writing {}", public_path.display()))?;
    Ok(public)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Stored;

    fn entry(n: u8) -> Entry {
        Entry { output_id: [n; 32], size: u64::from(n) * 10, put_time_ns: 1_700_000_000 + u64::from(n) }
    }

    fn key(n: u8) -> PrivateKey {
        PrivateKey(SigningKey::from_bytes(&[n; 32]))
    }

    fn accepts(trust: &Trust, lookup: &Lookup<'_>, action: &Digest, entry: &Entry, host_data: &[u8]) -> bool {
        host_data::decode(host_data).is_ok_and(|parsed| trust.accepts(lookup, action, entry, &parsed))
    }

    #[test]
    fn a_signature_covers_exactly_one_action_entry_and_way_of_storing() {
        let trust = Trust::new(Some(key(1)), Vec::new());
        let (at, host_data) = trust.seal(&[7; 32], &entry(1), Vec::new());
        let lookups = trust.lookups(&[7; 32]);
        assert_eq!(lookups.len(), 1);
        assert_eq!(lookups[0].key, at, "a signer reads where it writes");
        assert!(accepts(&trust, &lookups[0], &[7; 32], &entry(1), &host_data));
        assert!(!accepts(&trust, &lookups[0], &[8; 32], &entry(1), &host_data), "another action");
        assert!(!accepts(&trust, &lookups[0], &[7; 32], &entry(2), &host_data), "another output");
        let mut later = entry(1);
        later.put_time_ns += 1;
        assert!(!accepts(&trust, &lookups[0], &[7; 32], &later, &host_data), "another time");
        assert!(!accepts(&trust, &lookups[0], &[7; 32], &entry(1), &[]), "no signature");

        let zstd = |id| host_data::encode(&Stored::Zstd { id, size: 5 });
        let (_, compressed) = trust.seal(&[7; 32], &entry(1), zstd([3; 32]));
        assert!(accepts(&trust, &lookups[0], &[7; 32], &entry(1), &compressed));
        let mut swapped = zstd([4; 32]);
        swapped.extend_from_slice(&compressed[swapped.len()..]);
        assert!(!accepts(&trust, &lookups[0], &[7; 32], &entry(1), &swapped), "another stored body");
        let signature_only = &compressed[zstd([3; 32]).len()..];
        assert!(!accepts(&trust, &lookups[0], &[7; 32], &entry(1), signature_only), "a record dropped");
    }

    #[test]
    fn signers_write_apart_and_readers_trust_only_named_keys() {
        let main = Trust::new(Some(key(1)), Vec::new());
        let pr = Trust::new(Some(key(2)), vec![key(1).public()]);
        let (main_at, main_data) = main.seal(&[7; 32], &entry(1), Vec::new());
        let (pr_at, pr_data) = pr.seal(&[7; 32], &entry(2), Vec::new());
        assert_ne!(main_at, pr_at, "a pull request never overwrites the trusted entry");
        let reader = Trust::new(None, vec![key(1).public()]);
        let lookups = reader.lookups(&[7; 32]);
        assert_eq!(lookups[0].key, main_at);
        assert!(accepts(&reader, &lookups[0], &[7; 32], &entry(1), &main_data));
        assert!(!accepts(&reader, &lookups[0], &[7; 32], &entry(2), &pr_data), "signed, but by a key not trusted");
        // Rotation: both keys trusted, each looked up where it writes.
        let rotating = Trust::new(None, vec![key(1).public(), key(2).public()]);
        let keys: Vec<Digest> = rotating.lookups(&[7; 32]).iter().map(|l| l.key).collect();
        assert_eq!(keys, [main_at, pr_at]);
        // No keys at all: as before, the action id itself, nothing checked.
        let plain = Trust::default();
        assert!(!plain.in_use());
        assert_eq!(plain.seal(&[7; 32], &entry(1), Vec::new()), ([7; 32], Vec::new()));
        assert!(accepts(&plain, &plain.lookups(&[7; 32])[0], &[7; 32], &entry(9), &[]));
    }

    #[test]
    fn keys_round_trip_and_private_ones_must_be_private() {
        let dir = tempfile::tempdir().unwrap();
        let public = keygen(dir.path()).unwrap();
        let private = dir.path().join("signing.key");
        assert_eq!(fs::metadata(&private).unwrap().permissions().mode() & 0o777, 0o600);
        let key = PrivateKey::from_file(&private).unwrap();
        assert_eq!(key.public(), public);
        let pub_file = dir.path().join("signing.pub");
        assert_eq!(PublicKey::from_arg(pub_file.to_str().unwrap()).unwrap(), public);
        assert_eq!(PublicKey::from_arg(&public.to_string()).unwrap(), public);
        assert!(keygen(dir.path()).is_err(), "an existing key is never overwritten");
        fs::set_permissions(&private, fs::Permissions::from_mode(0o644)).unwrap();
        let e = PrivateKey::from_file(&private).err().unwrap().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        assert!(PublicKey::parse("gocp-ed25519:AAAA").is_err());
        assert!(PrivateKey::from_env_value(&public.to_string()).is_err(), "a public key is not a signing key");
    }
}
