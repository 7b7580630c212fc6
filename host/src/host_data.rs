//! The bytes gocp keeps with each entry in a backend (the contract's
//! `host-data`): how the entry's body is stored there, and who signed it.
//! Plugins store these bytes and give them back; they never read them.
//!
//! The format is a sequence of records, each a tag byte, a length (one byte;
//! two, little-endian, for `b` and `c`) and that many bytes, in this order,
//! each at most once:
//! - one of
//!   - `z`, 40 bytes: the body is stored compressed with zstd, under the
//!     SHA-256 of the compressed bytes (32 bytes) and their length (u64,
//!     little-endian);
//!   - `b`: the body itself, as is (it is not stored as a body);
//!   - `c`: the body itself, compressed with zstd;
//!
//!   without any, the body is stored as is, under its output id;
//! - `s`, 64 bytes: an ed25519 signature over the entry and every record
//!   before it (see `trust`); always last.
//!
//! No records at all is an entry stored as is and unsigned, which is also
//! what a plugin of the older contract (no host data) gives back. A record
//! this version does not know makes the entry unreadable here: a miss, never
//! a guess.
//!
//! It owns the format only; what a signature means is `trust`'s.

use std::sync::Arc;

use crate::domain::{Digest, Stored};

const ZSTD: u8 = b'z';
const BODY: u8 = b'b';
const BODY_ZSTD: u8 = b'c';
const SIGNATURE: u8 = b's';

/// The largest body carried in its entry: the contract allows 1 KiB of host
/// data, of which a signature record takes 66 bytes and the body's own
/// record 3.
pub const MAX_INLINE: usize = 896;

/// Host data as read back, still to be checked against the trusted keys.
#[derive(Debug, PartialEq, Eq)]
pub struct Parsed<'a> {
    pub stored: Stored,
    /// What a signature covers (besides the entry): the records before it.
    pub signed: &'a [u8],
    pub signature: Option<[u8; 64]>,
}

/// Written by a newer gocp, or damaged.
#[derive(Debug, PartialEq, Eq)]
pub struct Unreadable;

/// The records that say how the body is stored, ready to be signed.
pub fn encode(stored: &Stored) -> Vec<u8> {
    let mut out = Vec::new();
    match stored {
        Stored::AsIs => {}
        Stored::Zstd { id, size } => {
            out.extend_from_slice(&[ZSTD, 40]);
            out.extend_from_slice(id);
            out.extend_from_slice(&size.to_le_bytes());
        }
        Stored::Inline { bytes, compressed } => {
            debug_assert!(bytes.len() <= MAX_INLINE, "an inline body is at most MAX_INLINE bytes");
            out.push(if *compressed { BODY_ZSTD } else { BODY });
            out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
            out.extend_from_slice(bytes);
        }
    }
    out
}

/// Appends the signature over `records` (and the entry).
pub fn append_signature(records: &mut Vec<u8>, signature: &[u8; 64]) {
    records.extend_from_slice(&[SIGNATURE, 64]);
    records.extend_from_slice(signature);
}

pub fn decode(bytes: &[u8]) -> Result<Parsed<'_>, Unreadable> {
    let mut parsed = Parsed { stored: Stored::AsIs, signed: bytes, signature: None };
    let mut at = 0;
    let mut last_tag = 0u8;
    // Each record once, in the order above; nothing after a signature.
    let order = |t| match t {
        ZSTD | BODY | BODY_ZSTD => 1,
        SIGNATURE => 2,
        _ => 0,
    };
    while at < bytes.len() {
        let tag = bytes[at];
        let (len, head) = match tag {
            BODY | BODY_ZSTD => {
                let len = bytes.get(at + 1..at + 3).ok_or(Unreadable)?;
                (usize::from(u16::from_le_bytes([len[0], len[1]])), 3)
            }
            _ => (usize::from(*bytes.get(at + 1).ok_or(Unreadable)?), 2),
        };
        let value = bytes.get(at + head..at + head + len).ok_or(Unreadable)?;
        if order(tag) <= order(last_tag) || last_tag == SIGNATURE {
            return Err(Unreadable);
        }
        match (tag, value.len()) {
            (ZSTD, 40) => {
                let id: Digest = value[..32].try_into().expect("32 bytes");
                let size = u64::from_le_bytes(value[32..].try_into().expect("8 bytes"));
                parsed.stored = Stored::Zstd { id, size };
            }
            (BODY | BODY_ZSTD, n) if n <= MAX_INLINE => {
                parsed.stored = Stored::Inline { bytes: Arc::from(value), compressed: tag == BODY_ZSTD };
            }
            (SIGNATURE, 64) => {
                parsed.signed = &bytes[..at];
                parsed.signature = Some(value.try_into().expect("64 bytes"));
            }
            _ => return Err(Unreadable),
        }
        last_tag = tag;
        at += head + len;
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_read_back_as_written() {
        assert_eq!(decode(&[]), Ok(Parsed { stored: Stored::AsIs, signed: &[], signature: None }));
        let stored = Stored::Zstd { id: [7; 32], size: 1234 };
        let mut data = encode(&stored);
        let records = data.clone();
        assert_eq!(decode(&data).unwrap().stored, stored);
        append_signature(&mut data, &[9; 64]);
        let parsed = decode(&data).unwrap();
        assert_eq!((parsed.stored, parsed.signed, parsed.signature), (stored, &records[..], Some([9; 64])));

        for compressed in [false, true] {
            let stored = Stored::Inline { bytes: Arc::from(vec![5u8; MAX_INLINE]), compressed };
            let mut data = encode(&stored);
            let records = data.clone();
            append_signature(&mut data, &[9; 64]);
            assert!(data.len() <= 1024, "within the contract's host data: {} bytes", data.len());
            let parsed = decode(&data).unwrap();
            assert_eq!((parsed.stored, parsed.signed), (stored, &records[..]));
        }

        let mut unsigned_as_is = Vec::new();
        append_signature(&mut unsigned_as_is, &[1; 64]);
        assert_eq!(decode(&unsigned_as_is).unwrap().signed, &[] as &[u8]);
    }

    #[test]
    fn anything_else_is_unreadable() {
        let mut signed = encode(&Stored::Zstd { id: [7; 32], size: 1 });
        append_signature(&mut signed, &[9; 64]);
        let unknown_tag = [b'q', 1, 0];
        let truncated = &signed[..signed.len() - 1];
        let mut twice = encode(&Stored::Zstd { id: [7; 32], size: 1 });
        twice.extend(encode(&Stored::Zstd { id: [7; 32], size: 1 }));
        let mut after_signature = signed.clone();
        after_signature.extend(encode(&Stored::Zstd { id: [7; 32], size: 1 }));
        let wrong_length = [b'z', 3, 0, 0, 0];
        let mut body_and_zstd = encode(&Stored::Inline { bytes: Arc::from(&b"tiny"[..]), compressed: false });
        body_and_zstd.extend(encode(&Stored::Zstd { id: [7; 32], size: 1 }));
        let mut body_too_long = vec![b'c'];
        body_too_long.extend_from_slice(&(MAX_INLINE as u16 + 1).to_le_bytes());
        body_too_long.resize(3 + MAX_INLINE + 1, 1);
        let body_cut = [b'b', 5, 0, 1, 2];
        for bad in [
            &unknown_tag[..],
            truncated,
            &twice,
            &after_signature,
            &wrong_length,
            b"z",
            &body_and_zstd,
            &body_too_long,
            &body_cut,
            b"b\x01",
        ] {
            assert_eq!(decode(bad), Err(Unreadable), "{bad:?}");
        }
    }
}
