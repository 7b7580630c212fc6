//! Session manifests: which actions a go command used, so that the next
//! machine running the same build can bring their outputs into its local tier
//! ahead of its own go command's requests.
//!
//! Why: a warm build from a remote cache is a chain of round trips, because the
//! go command asks for one action at a time (its dependency order allows little
//! more), and each fetched output costs two round trips plus the transfer.
//! Knowing the list up front turns that chain into parallel background work.
//!
//! A manifest travels through the plugin as an ordinary output: its bytes are
//! a body, addressed by their hash, and small pointer entries name it. Small
//! outputs (most of a Go build's, by count) travel inside it, so they cost no
//! round trip at all; each is still verified against its output id. Each
//! item says how the backend stores its body (as is, or compressed under
//! another id, see `serve::stages`), so that fetching it needs no lookup
//! first. The
//! pointers are keyed by a hash of each of the session's first few distinct
//! gets, which are the same from one run of a build to the next (the go
//! command starts with the same packages), and which the next session knows
//! before it knows anything else. Plugins see only entries and bodies.
//!
//! It owns the format, the pointer keys and the session's list; it never talks
//! to the plugin or the store.

use std::collections::HashSet;
use std::sync::Mutex;

use sha2::{Digest as _, Sha256};

use crate::domain::{Digest, Entry, Stored};

const MAGIC: &[u8] = b"gocp manifest v2\n";
/// What manifests of earlier versions start with: the same items, without
/// how their bodies are stored (as is, then).
const MAGIC_V1: &[u8] = b"gocp manifest v1\n";
/// Per item: action id, output id, size and put time; (v2) how the body is
/// stored: 0 as is, 1 zstd (then its id and size), 2 not known (look its
/// entry up); then the length of the body carried inline (0, or the size),
/// then that body.
const HEAD: usize = 32 + 32 + 8 + 8;
const AS_IS: u8 = 0;
const ZSTD: u8 = 1;
const NOT_KNOWN: u8 = 2;
/// Outputs up to this size are carried inline.
pub const INLINE_MAX: u64 = 8 << 10;
/// The largest manifest written or read; a session using more lists its first
/// actions, which are the ones worth having early.
pub const MAX_BYTES: u64 = 16 << 20;
/// A session's first distinct gets that key its manifest. Several, because
/// the first requests of a build are issued concurrently (their order varies),
/// and because some are keyed by the checkout's absolute path (the go
/// command's module index), which may differ between machines where the
/// compile actions of the standard library and of `-trimpath` builds do not.
const KEYS: usize = 16;
/// Fewer actions than this are not worth a manifest (a `go list`, a small
/// test run): they cost little to fetch one by one.
const MIN_ITEMS: usize = 32;

/// The action id under which a manifest pointer for a session starting with
/// `first_get` is kept. Domain-separated, so it never names a real action.
pub fn pointer_key(first_get: &Digest) -> Digest {
    let mut h = Sha256::new();
    h.update(b"gocp manifest pointer v1\0");
    h.update(first_get);
    h.finalize().into()
}

/// One action a manifest lists.
#[derive(Debug, PartialEq, Eq)]
pub struct Item {
    pub action: Digest,
    pub entry: Entry,
    /// How the backend stores its body, if the session that wrote the
    /// manifest knew.
    pub stored: Option<Stored>,
    /// The output itself, for a small one. Unverified: whoever stores it
    /// checks it against `entry.output_id`.
    pub body: Option<Vec<u8>>,
}

/// Reads a manifest; `None` if the bytes are not one.
pub fn decode(bytes: &[u8]) -> Option<Vec<Item>> {
    let (mut rest, v1) = match bytes.strip_prefix(MAGIC) {
        Some(rest) => (rest, false),
        None => (bytes.strip_prefix(MAGIC_V1)?, true),
    };
    let mut items = Vec::new();
    while !rest.is_empty() {
        let mut take = |n: usize| -> Option<&[u8]> {
            let (taken, left) = rest.split_at_checked(n)?;
            rest = left;
            Some(taken)
        };
        let head = take(HEAD)?;
        let digest = |at: usize| -> Digest { head[at..at + 32].try_into().expect("32 bytes") };
        let u64_at = |at: usize| u64::from_le_bytes(head[at..at + 8].try_into().expect("8 bytes"));
        let (action, entry) = (digest(0), Entry { output_id: digest(32), size: u64_at(64), put_time_ns: u64_at(72) });
        let stored = match if v1 { AS_IS } else { take(1)?[0] } {
            AS_IS => Some(Stored::AsIs),
            ZSTD => {
                let z = take(40)?;
                let id: Digest = z[..32].try_into().expect("32 bytes");
                Some(Stored::Zstd { id, size: u64::from_le_bytes(z[32..].try_into().expect("8 bytes")) })
            }
            NOT_KNOWN => None,
            _ => return None,
        };
        let inline = u32::from_le_bytes(take(4)?.try_into().expect("4 bytes")) as usize;
        let body = match inline {
            0 if entry.size > 0 => None,
            n if n as u64 == entry.size => Some(take(n)?.to_vec()),
            _ => return None,
        };
        items.push(Item { action, entry, stored, body });
    }
    Some(items)
}

/// Writes a manifest of `items`, with how `stored_as` says each body is
/// stored and the bodies `small_body` gives for outputs up to
/// [`INLINE_MAX`]; stops before [`MAX_BYTES`].
fn encode(
    items: &[(Digest, Entry)],
    mut small_body: impl FnMut(&Entry) -> Option<Vec<u8>>,
    mut stored_as: impl FnMut(&Entry) -> Option<Stored>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAGIC.len() + items.len() * (HEAD + 5));
    out.extend_from_slice(MAGIC);
    let mut item = Vec::new();
    for (action, entry) in items {
        let body = if entry.size <= INLINE_MAX { small_body(entry) } else { None };
        let body = body.filter(|b| b.len() as u64 == entry.size).unwrap_or_default();
        item.clear();
        item.extend_from_slice(action);
        item.extend_from_slice(&entry.output_id);
        item.extend_from_slice(&entry.size.to_le_bytes());
        item.extend_from_slice(&entry.put_time_ns.to_le_bytes());
        match stored_as(entry) {
            Some(Stored::AsIs) => item.push(AS_IS),
            Some(Stored::Zstd { id, size }) => {
                item.push(ZSTD);
                item.extend_from_slice(&id);
                item.extend_from_slice(&size.to_le_bytes());
            }
            // Small enough to be carried here, unless its file is gone.
            Some(Stored::Inline { .. }) | None => item.push(NOT_KNOWN),
        }
        item.extend_from_slice(&(body.len() as u32).to_le_bytes());
        item.extend_from_slice(&body);
        if (out.len() + item.len()) as u64 > MAX_BYTES {
            break;
        }
        out.extend_from_slice(&item);
    }
    out
}

/// What one session used, in the order it first used it.
#[derive(Default)]
pub struct Recorder {
    inner: Mutex<Session>,
}

#[derive(Default)]
struct Session {
    first_gets: Vec<Digest>,
    items: Vec<(Digest, Entry)>,
    seen: HashSet<Digest>,
    /// Outputs the session stored (puts): what its list adds to a manifest
    /// read at its start.
    puts: usize,
}

/// A manifest to store, and the first gets to point at it from.
pub struct ToWrite {
    pub bytes: Vec<u8>,
    pub keys: Vec<Digest>,
}

impl Recorder {
    /// Notes a get; true if it is one of the first distinct gets, whose
    /// pointer may lead to a manifest.
    pub fn get(&self, action: &Digest) -> bool {
        let mut s = self.inner.lock().unwrap();
        if s.first_gets.len() >= KEYS || s.first_gets.contains(action) {
            return false;
        }
        s.first_gets.push(*action);
        true
    }

    /// Notes an action answered with `entry` (a hit).
    pub fn used(&self, action: &Digest, entry: &Entry) {
        let mut s = self.inner.lock().unwrap();
        if s.seen.insert(*action) {
            s.items.push((*action, *entry));
        }
    }

    /// Notes a put of `action`.
    pub fn put(&self, action: &Digest, entry: &Entry) {
        self.used(action, entry);
        self.inner.lock().unwrap().puts += 1;
    }

    /// The manifest this session should leave, if any, with small outputs
    /// from `small_body` and how bodies are stored from `stored_as`. None when the session was small, or when it started
    /// from a manifest and stored little of its own (under an eighth of what
    /// it used): the one it read still describes it well enough, and an
    /// edit-build loop should not upload a manifest per build.
    pub fn finish(
        &self,
        started_from_one: bool,
        small_body: impl FnMut(&Entry) -> Option<Vec<u8>>,
        stored_as: impl FnMut(&Entry) -> Option<Stored>,
    ) -> Option<ToWrite> {
        let s = self.inner.lock().unwrap();
        let adds_little = s.puts * 8 < s.items.len();
        if s.items.len() < MIN_ITEMS || (started_from_one && adds_little) || s.first_gets.is_empty() {
            return None;
        }
        Some(ToWrite { bytes: encode(&s.items, small_body, stored_as), keys: s.first_gets.clone() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: u8) -> Entry {
        Entry { output_id: [n; 32], size: u64::from(n) * 1000, put_time_ns: 1_700_000_000_000_000_000 + u64::from(n) }
    }

    #[test]
    fn a_session_list_round_trips_in_first_use_order() {
        let r = Recorder::default();
        assert!(r.get(&[1; 32]));
        for n in 0..40u8 {
            r.used(&[n; 32], &entry(n));
        }
        for n in 90..100u8 {
            r.put(&[n; 32], &entry(n));
        }
        r.used(&[3; 32], &entry(7));
        // Outputs of up to 8 KB (n <= 8 here) come inline.
        let stored_as = |e: &Entry| match e.output_id[0] {
            3 => Some(Stored::AsIs),
            99 => Some(Stored::Zstd { id: [42; 32], size: 17 }),
            _ => None,
        };
        let w = r.finish(true, |e| Some(vec![e.output_id[0]; e.size as usize]), stored_as).expect("enough puts");
        assert_eq!(w.keys, vec![[1; 32]]);
        let items = decode(&w.bytes).unwrap();
        assert_eq!(items.len(), 50);
        let item3 = Item { action: [3; 32], entry: entry(3), stored: Some(Stored::AsIs), body: Some(vec![3; 3000]) };
        assert_eq!(items[3], item3, "first use kept");
        assert_eq!(items[0].body, Some(Vec::new()), "an empty output is inline too");
        assert_eq!(items[9].body, None, "9000 bytes is over the inline limit");
        let stored = Some(Stored::Zstd { id: [42; 32], size: 17 });
        assert_eq!(items[49], Item { action: [99; 32], entry: entry(99), stored, body: None });
        assert_eq!(items[48].stored, None, "not known: looked up");
    }

    #[test]
    fn a_body_that_cannot_be_read_is_left_to_fetch() {
        let r = Recorder::default();
        r.get(&[1; 32]);
        for n in 0..40u8 {
            r.put(&[n; 32], &entry(n));
        }
        let w = r.finish(false, |e| (e.output_id[0] != 2).then(|| vec![0; 5]), |_| None).unwrap();
        let items = decode(&w.bytes).unwrap();
        assert_eq!(items[2].body, None, "not readable");
        assert_eq!(items[1].body, None, "the wrong length is not carried");
    }

    #[test]
    fn only_the_first_distinct_gets_are_keys() {
        let r = Recorder::default();
        assert!(r.get(&[1; 32]));
        assert!(!r.get(&[1; 32]));
        assert!(r.get(&[2; 32]));
        assert!(r.get(&[3; 32]));
        for n in 4..=16u8 {
            assert!(r.get(&[n; 32]));
        }
        assert!(!r.get(&[17; 32]));
        assert_ne!(pointer_key(&[1; 32]), [1; 32]);
        assert_ne!(pointer_key(&[1; 32]), pointer_key(&[2; 32]));
    }

    #[test]
    fn small_or_unchanged_sessions_leave_none() {
        let r = Recorder::default();
        r.get(&[1; 32]);
        for n in 0..10u8 {
            r.put(&[n; 32], &entry(n));
        }
        assert!(r.finish(false, |_| None, |_| None).is_none(), "too small");
        for n in 10..40u8 {
            r.used(&[n; 32], &entry(n));
        }
        assert!(r.finish(false, |_| None, |_| None).is_some());

        let mostly_hits = Recorder::default();
        mostly_hits.get(&[1; 32]);
        for n in 0..40u8 {
            mostly_hits.used(&[n; 32], &entry(n));
        }
        mostly_hits.put(&[200; 32], &entry(200));
        assert!(mostly_hits.finish(true, |_| None, |_| None).is_none(), "little new since the manifest it read");
        assert!(mostly_hits.finish(false, |_| None, |_| None).is_some(), "no manifest yet");
    }

    #[test]
    fn other_bytes_are_not_manifests() {
        assert!(decode(b"").is_none());
        assert!(decode(b"gocp manifest v3\n").is_none());
        let mut bytes = encode(&[([1; 32], entry(1))], |_| None, |_| Some(Stored::AsIs));
        assert_eq!(decode(&bytes).unwrap().len(), 1);
        bytes.push(0);
        assert!(decode(&bytes).is_none(), "a partial item");
        let mut inline = encode(&[([1; 32], entry(1))], |_| Some(vec![7; 1000]), |_| None);
        inline.pop();
        assert!(decode(&inline).is_none(), "a cut inline body");
        let mut unknown_storage = encode(&[([1; 32], entry(1))], |_| None, |_| None);
        unknown_storage[MAGIC.len() + HEAD] = 9;
        assert!(decode(&unknown_storage).is_none(), "a way of storing this version does not know");
    }

    #[test]
    fn a_manifest_of_the_first_version_still_reads() {
        let mut v1 = MAGIC_V1.to_vec();
        for (action, e, inline) in [([1; 32], entry(1), true), ([9; 32], entry(9), false)] {
            v1.extend_from_slice(&action);
            v1.extend_from_slice(&e.output_id);
            v1.extend_from_slice(&e.size.to_le_bytes());
            v1.extend_from_slice(&e.put_time_ns.to_le_bytes());
            let body = if inline { vec![1; e.size as usize] } else { Vec::new() };
            v1.extend_from_slice(&(body.len() as u32).to_le_bytes());
            v1.extend_from_slice(&body);
        }
        let items = decode(&v1).unwrap();
        assert_eq!(
            items[0],
            Item { action: [1; 32], entry: entry(1), stored: Some(Stored::AsIs), body: Some(vec![1; 1000]) }
        );
        assert_eq!(items[1], Item { action: [9; 32], entry: entry(9), stored: Some(Stored::AsIs), body: None });
    }
}
