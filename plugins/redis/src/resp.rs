//! RESP2, the Redis wire protocol, as this plugin speaks it: commands written as
//! arrays of bulk strings, replies read one at a time from a buffered stream.
//!
//! It owns the framing only. It must never decide what a reply means for the
//! cache, never own a connection, and never read a value of unbounded size into
//! memory: a large value is announced by [`Head::Bulk`] and streamed by the caller.
//!
//! Hand-written rather than a crate: the RESP crates (redis-protocol, redis's
//! parser) decode whole frames into memory, and a body here is a value of up to
//! 512 MiB that must stream. The subset needed (five reply types, no arrays) is
//! small and tested below.

use std::io::{self, BufRead, Read};

/// The longest status or error line accepted: Redis' own are well under 1 KiB.
const MAX_LINE: u64 = 64 << 10;

/// The first line of a reply.
#[derive(Debug, PartialEq, Eq)]
pub enum Head {
    /// `+OK`
    Simple(String),
    /// `-ERR ...`, `-WRONGPASS ...`: the server refused the command.
    Error(String),
    /// `:1`
    Integer(i64),
    /// `$-1`: no such key.
    Nil,
    /// `$N`: N bytes follow, then CRLF (see [`finish_bulk`]).
    Bulk(u64),
}

/// A complete small reply.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    Simple(String),
    Error(String),
    Integer(i64),
    Nil,
    Bulk(Vec<u8>),
}

#[derive(Debug)]
pub enum ReadError {
    /// The connection failed or timed out.
    Io(io::Error),
    /// The peer sent something that is not RESP2 as Redis speaks it.
    Protocol(String),
    /// A value larger than the caller's bound; its bytes are still unread.
    TooLarge(u64),
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> Self {
        ReadError::Io(e)
    }
}

/// The start of a command of `argc` arguments; each follows with [`arg`].
pub fn command(argc: usize) -> Vec<u8> {
    format!("*{argc}\r\n").into_bytes()
}

/// Appends one argument as a bulk string.
pub fn arg(out: &mut Vec<u8>, bytes: &[u8]) {
    bulk_head(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
    out.extend_from_slice(b"\r\n");
}

/// Appends the header of an argument of `len` bytes whose bytes the caller
/// writes itself, followed by CRLF.
pub fn bulk_head(out: &mut Vec<u8>, len: u64) {
    out.extend_from_slice(format!("${len}\r\n").as_bytes());
}

/// A whole command as bytes.
pub fn encode(args: &[&[u8]]) -> Vec<u8> {
    let mut out = command(args.len());
    for a in args {
        arg(&mut out, a);
    }
    out
}

/// Reads one line, without its CRLF.
fn read_line(r: &mut impl BufRead) -> Result<String, ReadError> {
    let mut line = Vec::new();
    r.by_ref().take(MAX_LINE).read_until(b'\n', &mut line)?;
    if line.is_empty() {
        return Err(ReadError::Io(io::Error::new(io::ErrorKind::UnexpectedEof, "the server closed the connection")));
    }
    if !line.ends_with(b"\r\n") {
        return Err(ReadError::Protocol(format!("a reply line without CRLF: {:?}", preview(&line))));
    }
    line.truncate(line.len() - 2);
    String::from_utf8(line).map_err(|e| ReadError::Protocol(format!("a reply line that is not UTF-8: {e}")))
}

/// Reads the first line of a reply.
pub fn read_head(r: &mut impl BufRead) -> Result<Head, ReadError> {
    let line = read_line(r)?;
    let (kind, rest) = line.split_at(line.chars().next().map_or(0, char::len_utf8));
    let number = |rest: &str| {
        rest.parse::<i64>().map_err(|_| ReadError::Protocol(format!("a reply {line:?} whose length is not a number")))
    };
    match kind {
        "+" => Ok(Head::Simple(rest.to_string())),
        "-" => Ok(Head::Error(rest.to_string())),
        ":" => Ok(Head::Integer(number(rest)?)),
        "$" => match number(rest)? {
            -1 => Ok(Head::Nil),
            n if n >= 0 => Ok(Head::Bulk(n as u64)),
            _ => Err(ReadError::Protocol(format!("a bulk reply of negative length: {line:?}"))),
        },
        _ => Err(ReadError::Protocol(format!(
            "an unexpected reply {:?} (is this a Redis server?)",
            preview(line.as_bytes())
        ))),
    }
}

/// Reads the CRLF that ends a bulk value whose bytes the caller consumed.
pub fn finish_bulk(r: &mut impl BufRead) -> Result<(), ReadError> {
    let mut crlf = [0u8; 2];
    r.read_exact(&mut crlf)?;
    if &crlf != b"\r\n" {
        return Err(ReadError::Protocol("a bulk value longer than announced".into()));
    }
    Ok(())
}

/// Reads one whole reply; a bulk value longer than `max_bulk` is not read
/// (`TooLarge`), so the connection is then out of step and must be dropped.
pub fn read_reply(r: &mut impl BufRead, max_bulk: u64) -> Result<Reply, ReadError> {
    Ok(match read_head(r)? {
        Head::Simple(s) => Reply::Simple(s),
        Head::Error(s) => Reply::Error(s),
        Head::Integer(n) => Reply::Integer(n),
        Head::Nil => Reply::Nil,
        Head::Bulk(n) if n > max_bulk => return Err(ReadError::TooLarge(n)),
        Head::Bulk(n) => {
            let mut value = vec![0u8; n as usize];
            r.read_exact(&mut value)?;
            finish_bulk(r)?;
            Reply::Bulk(value)
        }
    })
}

/// The start of an unexpected line, for messages.
fn preview(bytes: &[u8]) -> String {
    String::from_utf8_lossy(&bytes[..bytes.len().min(60)]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(bytes: &[u8]) -> Result<Reply, ReadError> {
        read_reply(&mut &bytes[..], 16)
    }

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        assert_eq!(encode(&[b"GET", b"gocp/ac/x"]), b"*2\r\n$3\r\nGET\r\n$9\r\ngocp/ac/x\r\n");
        assert_eq!(encode(&[b"SET", b"k", b""]), b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n");
        let mut streamed = command(3);
        arg(&mut streamed, b"SET");
        arg(&mut streamed, b"k");
        bulk_head(&mut streamed, 2);
        streamed.extend_from_slice(b"ab\r\n");
        assert_eq!(streamed, encode(&[b"SET", b"k", b"ab"]));
    }

    #[test]
    fn replies_of_every_kind_parse() {
        assert_eq!(reply(b"+OK\r\n").unwrap(), Reply::Simple("OK".into()));
        assert_eq!(reply(b"-WRONGPASS invalid\r\n").unwrap(), Reply::Error("WRONGPASS invalid".into()));
        assert_eq!(reply(b":1\r\n").unwrap(), Reply::Integer(1));
        assert_eq!(reply(b"$-1\r\n").unwrap(), Reply::Nil);
        assert_eq!(reply(b"$5\r\nab\r\nc\r\n").unwrap(), Reply::Bulk(b"ab\r\nc".to_vec()));
        assert_eq!(reply(b"$0\r\n\r\n").unwrap(), Reply::Bulk(vec![]));
    }

    #[test]
    fn replies_follow_each_other_on_one_stream() {
        let mut r = &b"+OK\r\n$2\r\nhi\r\n:0\r\n"[..];
        assert_eq!(read_reply(&mut r, 16).unwrap(), Reply::Simple("OK".into()));
        assert_eq!(read_reply(&mut r, 16).unwrap(), Reply::Bulk(b"hi".to_vec()));
        assert_eq!(read_reply(&mut r, 16).unwrap(), Reply::Integer(0));
        assert!(matches!(read_reply(&mut r, 16), Err(ReadError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof));
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        assert!(matches!(reply(b"$17\r\n"), Err(ReadError::TooLarge(17))));
        assert!(matches!(reply(b"$3\r\nabcd\r\n"), Err(ReadError::Protocol(_))));
        assert!(matches!(reply(b"$-2\r\n"), Err(ReadError::Protocol(_))));
        assert!(matches!(reply(b"$x\r\n"), Err(ReadError::Protocol(_))));
        assert!(matches!(reply(b"*1\r\n"), Err(ReadError::Protocol(_))));
        assert!(matches!(reply(b"HTTP/1.1 400\r\n"), Err(ReadError::Protocol(_))));
        assert!(matches!(reply(b"+OK\n"), Err(ReadError::Protocol(_))));
        assert!(matches!(reply(b"$4\r\nab"), Err(ReadError::Io(_))));
        assert!(matches!(reply(b""), Err(ReadError::Io(_))));
        assert!(matches!(reply("é\r\n".as_bytes()), Err(ReadError::Protocol(_))));
        assert!(matches!(read_head(&mut &[b'+'; 70_000][..]), Err(ReadError::Protocol(_))));
    }

    #[test]
    fn a_streamed_bulk_is_announced_then_ended() {
        let mut r = &b"$3\r\nabc\r\n+OK\r\n"[..];
        assert_eq!(read_head(&mut r).unwrap(), Head::Bulk(3));
        let mut value = [0u8; 3];
        r.read_exact(&mut value).unwrap();
        finish_bulk(&mut r).unwrap();
        assert_eq!(read_head(&mut r).unwrap(), Head::Simple("OK".into()));
    }
}
