//! The Rust SDK for gocp cache backend plugins.
//!
//! It owns the glue between the WIT contract in `wit/gocp.wit` and a plain Rust
//! trait: implement [`Backend`], then `gocp_plugin_sdk::export_backend!(MyBackend);`
//! and build with `cargo build --release --target wasm32-wasip2`. The WIT file's
//! comments are the reference for what each call must do; this crate adds no
//! policy of its own and must never grow any (the host enforces the contract).

use std::cell::RefCell;
use std::io::{Read, Write};
use std::time::Duration;

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "gocp:cache/plugin",
        pub_export_macro: true,
        export_macro_name: "export_plugin_world",
        default_bindings_module: "gocp_plugin_sdk::bindings",
        generate_all,
    });
}

use bindings::exports::gocp::cache::backend as wit;
pub use bindings::gocp::cache::types::{Capabilities, ConfigKey, Info};
pub use bindings::wasi::io::streams::{InputStream, OutputStream, StreamError};

/// A SHA-256 digest: an action id or an output id.
pub type Digest = [u8; 32];

/// Lower-case hex of a digest, the usual way to turn one into a file or key name.
pub fn hex(d: &Digest) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(64);
    for b in d {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 15) as usize] as char);
    }
    s
}

/// Parses 64 hex digits back into a digest.
pub fn parse_hex(s: &str) -> Option<Digest> {
    let s = s.as_bytes();
    if s.len() != 64 {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut d = [0u8; 32];
    for (i, out) in d.iter_mut().enumerate() {
        *out = nibble(s[2 * i])? << 4 | nibble(s[2 * i + 1])?;
    }
    Some(d)
}

/// What an action produced (see `entry` in the WIT file).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub output_id: Digest,
    pub size: u64,
    pub put_time_ns: u64,
    /// The host's bytes: keep them with the entry and give them back as they
    /// came (see `host-data` in the WIT file).
    pub host_data: Vec<u8>,
}

/// Bodies up to this size are best sent without first asking the store
/// whether it has them (see `write-body` in the WIT file): asking costs a
/// round trip, as sending a body this small does, and the store rarely has it.
pub const SEND_WITHOUT_ASKING: u64 = 64 * 1024;

/// The most host data an entry may carry (see the WIT file).
pub const MAX_HOST_DATA: usize = 1024;

/// Longer than any line [`Entry::to_line`] writes: what a plugin reading
/// entries back needs to read at most.
pub const MAX_ENTRY_LINE: usize = 4096;

impl Entry {
    /// The entry as one line of text, `v2 <output hex> <size> <put time ns>
    /// <host data hex, or - when empty>\n`: the format the shipped plugins
    /// store, readable by people and by [`Entry::parse`]. A plugin may keep
    /// entries in any format it likes.
    pub fn to_line(&self) -> String {
        let host_data = if self.host_data.is_empty() { "-".to_string() } else { hex_bytes(&self.host_data) };
        format!("v2 {} {} {} {host_data}\n", hex(&self.output_id), self.size, self.put_time_ns)
    }

    /// Parses what [`Entry::to_line`] wrote, and the `v1` lines of earlier
    /// versions (without host data); `None` for anything else.
    pub fn parse(text: &str) -> Option<Entry> {
        let mut fields = text.trim_end().split(' ');
        let version = fields.next()?;
        let output_id = parse_hex(fields.next()?)?;
        let size = fields.next()?.parse().ok()?;
        let put_time_ns = fields.next()?.parse().ok()?;
        let host_data = match version {
            "v1" => Vec::new(),
            "v2" => match fields.next()? {
                "-" => Vec::new(),
                h => parse_hex_bytes(h).filter(|b| b.len() <= MAX_HOST_DATA)?,
            },
            _ => return None,
        };
        fields.next().is_none().then_some(Entry { output_id, size, put_time_ns, host_data })
    }
}

fn hex_bytes(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_hex_bytes(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// Why a call did not succeed (see `error` in the WIT file).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    NotFound,
    Unavailable(String),
    Broken(String),
    InvalidConfig(String),
}

impl Error {
    /// A `broken` error built from any displayable cause, with context.
    pub fn broken(context: &str, cause: impl std::fmt::Display) -> Self {
        Error::Broken(format!("{context}: {cause}"))
    }

    /// A `unavailable` error built from any displayable cause, with context.
    pub fn unavailable(context: &str, cause: impl std::fmt::Display) -> Self {
        Error::Unavailable(format!("{context}: {cause}"))
    }
}

/// A cache backend. One value lives per instance, created by `open`.
pub trait Backend: Sized + 'static {
    /// What the plugin is; must not depend on configuration.
    fn describe() -> Info;

    /// Builds the backend from the user's configuration. Use [`Config`]'s
    /// `take_*` methods and finish with [`Config::finish`], which rejects keys
    /// nobody took.
    fn open(config: Config) -> Result<(Self, Capabilities), Error>;

    fn read_entry(&mut self, action_id: &Digest) -> Result<Entry, Error>;

    fn write_entry(&mut self, action_id: &Digest, entry: Entry) -> Result<(), Error>;

    /// Only called when `open` returned `stores_bodies: true`.
    fn read_body(&mut self, _output_id: &Digest, _size: u64, _sink: &OutputStream) -> Result<(), Error> {
        Err(Error::NotFound)
    }

    /// Only called when `open` returned `stores_bodies: true`.
    fn write_body(&mut self, _output_id: &Digest, _size: u64, _body: &InputStream) -> Result<(), Error> {
        Ok(())
    }

    fn finish(&mut self) -> Result<(), Error> {
        Ok(())
    }
}

/// The `--config key=value` pairs given to `open`, with parsers for the usual
/// kinds of value. Every `take_*` removes the key, so that [`Config::finish`]
/// can name the keys the plugin does not know.
pub struct Config {
    pairs: Vec<(String, String)>,
}

impl Config {
    pub fn new(pairs: Vec<(String, String)>) -> Self {
        Config { pairs }
    }

    /// The last value given for `key`, if any (later values override earlier ones).
    pub fn take(&mut self, key: &str) -> Option<String> {
        let mut found = None;
        self.pairs.retain(|(k, v)| {
            if k == key {
                found = Some(v.clone());
                false
            } else {
                true
            }
        });
        found
    }

    /// A byte size such as `512MiB`, `10GB`, `4096` (plain bytes).
    pub fn take_size(&mut self, key: &str, default: u64) -> Result<u64, Error> {
        match self.take(key) {
            None => Ok(default),
            Some(v) => parse_size(&v)
                .ok_or_else(|| Error::InvalidConfig(format!("{key}={v}: expected a size such as 512MiB or 10GB"))),
        }
    }

    /// A duration such as `90s`, `30m`, `12h`, `5d`.
    pub fn take_duration(&mut self, key: &str, default: Duration) -> Result<Duration, Error> {
        match self.take(key) {
            None => Ok(default),
            Some(v) => parse_duration(&v).ok_or_else(|| {
                Error::InvalidConfig(format!("{key}={v}: expected a duration such as 90s, 30m, 12h or 5d"))
            }),
        }
    }

    /// `true`/`false` (also `yes`/`no`, `1`/`0`).
    pub fn take_bool(&mut self, key: &str, default: bool) -> Result<bool, Error> {
        match self.take(key).as_deref() {
            None => Ok(default),
            Some("true" | "yes" | "1") => Ok(true),
            Some("false" | "no" | "0") => Ok(false),
            Some(v) => Err(Error::InvalidConfig(format!("{key}={v}: expected true or false"))),
        }
    }

    /// Fails with `invalid-config` naming every key that was not taken.
    pub fn finish(self) -> Result<(), Error> {
        if self.pairs.is_empty() {
            return Ok(());
        }
        let keys: Vec<&str> = self.pairs.iter().map(|(k, _)| k.as_str()).collect();
        Err(Error::InvalidConfig(format!("unknown configuration key(s): {}", keys.join(", "))))
    }
}

/// Parses a size such as `4096`, `64KiB`, `512MiB` or `10GB` into bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    s.trim().parse::<bytesize::ByteSize>().ok().map(|b| b.as_u64())
}

/// Parses a duration such as `90s`, `30m`, `12h` or `5d`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    humantime::parse_duration(s.trim()).ok()
}

/// Reads a body stream to its end into `out`, returning the number of bytes.
pub fn copy_from_stream(body: &InputStream, out: &mut impl Write) -> Result<u64, Error> {
    let mut total = 0u64;
    loop {
        match body.blocking_read(1 << 20) {
            Ok(chunk) => {
                out.write_all(&chunk).map_err(|e| Error::broken("writing body", e))?;
                total += chunk.len() as u64;
            }
            Err(StreamError::Closed) => return Ok(total),
            Err(StreamError::LastOperationFailed(e)) => {
                return Err(Error::broken("reading body from host", e.to_debug_string()));
            }
        }
    }
}

/// Writes everything `src` yields into `sink`, in chunks as large as the sink allows.
pub fn copy_to_stream(src: &mut impl Read, sink: &OutputStream) -> Result<u64, Error> {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = src.read(&mut buf).map_err(|e| Error::broken("reading body", e))?;
        if n == 0 {
            return Ok(total);
        }
        write_all(sink, &buf[..n])?;
        total += n as u64;
    }
}

/// Writes a whole buffer into `sink`, waiting whenever it asks to.
pub fn write_all(sink: &OutputStream, mut bytes: &[u8]) -> Result<(), Error> {
    let failed = |e: StreamError| match e {
        StreamError::Closed => Error::Broken("the host closed the body stream".into()),
        StreamError::LastOperationFailed(e) => Error::broken("writing body to host", e.to_debug_string()),
    };
    while !bytes.is_empty() {
        let permit = sink.check_write().map_err(failed)? as usize;
        if permit == 0 {
            sink.subscribe().block();
            continue;
        }
        let n = permit.min(bytes.len());
        sink.write(&bytes[..n]).map_err(failed)?;
        bytes = &bytes[n..];
    }
    Ok(())
}

#[doc(hidden)]
pub mod glue {
    //! What `export_backend!` expands to calls: conversions between the WIT
    //! types and the SDK's, and the per-instance state.
    use super::*;

    pub type State<B> = RefCell<Option<B>>;

    fn digest(bytes: &[u8]) -> Result<Digest, Error> {
        bytes.try_into().map_err(|_| Error::Broken(format!("digest of {} bytes, want 32", bytes.len())))
    }

    fn to_wit(e: Error) -> wit::Error {
        match e {
            Error::NotFound => wit::Error::NotFound,
            Error::Unavailable(m) => wit::Error::Unavailable(m),
            Error::Broken(m) => wit::Error::Broken(m),
            Error::InvalidConfig(m) => wit::Error::InvalidConfig(m),
        }
    }

    fn with<B: Backend, T>(
        state: &'static std::thread::LocalKey<State<B>>,
        f: impl FnOnce(&mut B) -> Result<T, Error>,
    ) -> Result<T, wit::Error> {
        state.with(|s| match s.borrow_mut().as_mut() {
            Some(b) => f(b).map_err(to_wit),
            None => Err(wit::Error::Broken("called before open".into())),
        })
    }

    pub fn describe<B: Backend>() -> Info {
        B::describe()
    }

    pub fn open<B: Backend>(
        state: &'static std::thread::LocalKey<State<B>>,
        config: Vec<(String, String)>,
    ) -> Result<Capabilities, wit::Error> {
        let (backend, caps) = B::open(Config::new(config)).map_err(to_wit)?;
        state.with(|s| *s.borrow_mut() = Some(backend));
        Ok(caps)
    }

    pub fn read_entry<B: Backend>(
        state: &'static std::thread::LocalKey<State<B>>,
        action_id: Vec<u8>,
    ) -> Result<wit::Entry, wit::Error> {
        with(state, |b| {
            let e = b.read_entry(&digest(&action_id)?)?;
            Ok(wit::Entry {
                output_id: e.output_id.to_vec(),
                size: e.size,
                put_time_ns: e.put_time_ns,
                host_data: e.host_data,
            })
        })
    }

    pub fn read_body<B: Backend>(
        state: &'static std::thread::LocalKey<State<B>>,
        output_id: Vec<u8>,
        size: u64,
        sink: &OutputStream,
    ) -> Result<(), wit::Error> {
        with(state, |b| b.read_body(&digest(&output_id)?, size, sink))
    }

    pub fn write_body<B: Backend>(
        state: &'static std::thread::LocalKey<State<B>>,
        output_id: Vec<u8>,
        size: u64,
        body: &InputStream,
    ) -> Result<(), wit::Error> {
        with(state, |b| b.write_body(&digest(&output_id)?, size, body))
    }

    pub fn write_entry<B: Backend>(
        state: &'static std::thread::LocalKey<State<B>>,
        action_id: Vec<u8>,
        entry: wit::Entry,
    ) -> Result<(), wit::Error> {
        with(state, |b| {
            if entry.host_data.len() > MAX_HOST_DATA {
                return Err(Error::Broken(format!(
                    "{} bytes of host data, more than the contract allows",
                    entry.host_data.len()
                )));
            }
            let e = Entry {
                output_id: digest(&entry.output_id)?,
                size: entry.size,
                put_time_ns: entry.put_time_ns,
                host_data: entry.host_data,
            };
            b.write_entry(&digest(&action_id)?, e)
        })
    }

    pub fn finish<B: Backend>(state: &'static std::thread::LocalKey<State<B>>) -> Result<(), wit::Error> {
        with(state, |b| b.finish())
    }
}

/// Exports a [`Backend`] implementation as the plugin's `backend` interface.
/// Use it once, at the top level of the plugin crate.
#[macro_export]
macro_rules! export_backend {
    ($backend:ty) => {
        thread_local! {
            static __GOCP_STATE: $crate::glue::State<$backend> = const { ::std::cell::RefCell::new(None) };
        }

        struct __GocpExport;

        impl $crate::bindings::exports::gocp::cache::backend::Guest for __GocpExport {
            fn describe() -> $crate::Info {
                $crate::glue::describe::<$backend>()
            }
            fn open(
                config: ::std::vec::Vec<(::std::string::String, ::std::string::String)>,
            ) -> Result<$crate::Capabilities, $crate::bindings::exports::gocp::cache::backend::Error> {
                $crate::glue::open(&__GOCP_STATE, config)
            }
            fn read_entry(
                action_id: ::std::vec::Vec<u8>,
            ) -> Result<
                $crate::bindings::exports::gocp::cache::backend::Entry,
                $crate::bindings::exports::gocp::cache::backend::Error,
            > {
                $crate::glue::read_entry(&__GOCP_STATE, action_id)
            }
            fn read_body(
                output_id: ::std::vec::Vec<u8>,
                size: u64,
                sink: &$crate::OutputStream,
            ) -> Result<(), $crate::bindings::exports::gocp::cache::backend::Error> {
                $crate::glue::read_body(&__GOCP_STATE, output_id, size, sink)
            }
            fn write_body(
                output_id: ::std::vec::Vec<u8>,
                size: u64,
                body: &$crate::InputStream,
            ) -> Result<(), $crate::bindings::exports::gocp::cache::backend::Error> {
                $crate::glue::write_body(&__GOCP_STATE, output_id, size, body)
            }
            fn write_entry(
                action_id: ::std::vec::Vec<u8>,
                entry: $crate::bindings::exports::gocp::cache::backend::Entry,
            ) -> Result<(), $crate::bindings::exports::gocp::cache::backend::Error> {
                $crate::glue::write_entry(&__GOCP_STATE, action_id, entry)
            }
            fn finish() -> Result<(), $crate::bindings::exports::gocp::cache::backend::Error> {
                $crate::glue::finish(&__GOCP_STATE)
            }
        }

        $crate::bindings::export_plugin_world!(__GocpExport with_types_in $crate::bindings);
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_durations_and_hex_parse() {
        assert_eq!(parse_size("512MiB"), Some(512 << 20));
        assert_eq!(parse_size("10GB"), Some(10_000_000_000));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("lots"), None);
        assert_eq!(parse_duration("5d"), Some(Duration::from_secs(5 * 86_400)));
        assert_eq!(parse_duration("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("soon"), None);
        let d: Digest = std::array::from_fn(|i| i as u8 * 7);
        assert_eq!(parse_hex(&hex(&d)), Some(d));
        assert_eq!(parse_hex("zz"), None);
    }

    #[test]
    fn entry_lines_round_trip() {
        let mut entry =
            Entry { output_id: [0xab; 32], size: 12345, put_time_ns: 1_700_000_000_123_456_789, host_data: Vec::new() };
        assert_eq!(Entry::parse(&entry.to_line()), Some(entry.clone()));
        entry.host_data = vec![1, 0xfe, 7];
        assert!(entry.to_line().ends_with(" 01fe07\n"));
        assert_eq!(Entry::parse(&entry.to_line()), Some(entry));
        let v1 = format!("v1 {} 1 2\n", hex(&[0; 32]));
        assert_eq!(Entry::parse(&v1).map(|e| e.host_data), Some(Vec::new()), "lines of earlier versions still read");
        assert_eq!(Entry::parse("v2 00 1 2 -"), None);
        assert_eq!(Entry::parse(&format!("v1 {} 1 2 extra", hex(&[0; 32]))), None);
        assert_eq!(Entry::parse(&format!("v2 {} 1 2 0g", hex(&[0; 32]))), None);
    }

    #[test]
    fn config_rejects_unknown_keys() {
        let mut c = Config::new(vec![("a".into(), "1".into()), ("b".into(), "x".into()), ("a".into(), "2".into())]);
        assert_eq!(c.take("a").as_deref(), Some("2"));
        assert!(c.take_bool("b", false).is_err());
        let mut c = Config::new(vec![("typo".into(), "1".into())]);
        assert_eq!(c.take("max-bytes"), None);
        assert_eq!(c.finish(), Err(Error::InvalidConfig("unknown configuration key(s): typo".into())));
    }
}
