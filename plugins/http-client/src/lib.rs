//! One HTTP exchange over wasi:http for gocp plugins: a request with an
//! optional body (small bytes, or streamed from the host with its
//! Content-Length), and a response whose body is read in bounded chunks.
//!
//! It owns the order in which wasi:http resources are created and dropped (a
//! child resource dropped after its parent makes the host trap), the time limit
//! on every wait, and the words for transport failures. It must never know
//! what is stored or where (no status codes, no error documents: those are the
//! plugin's), and never hold a whole body in memory.

use std::time::Duration;

use gocp_plugin_sdk::{Error, InputStream as HostInput, OutputStream as HostOutput, StreamError as HostStreamError};
use url::{Position, Url};
use wasip2::clocks::monotonic_clock::subscribe_duration;
use wasip2::http::outgoing_handler;
use wasip2::http::types::{
    ErrorCode, Fields, FutureIncomingResponse, IncomingBody, IncomingResponse, IoError, OutgoingBody, OutgoingRequest,
    RequestOptions, Scheme,
};
use wasip2::io::poll::{Pollable, poll};
use wasip2::io::streams::{InputStream, OutputStream, StreamError};

/// Re-exported so that a plugin needs no wasi:http bindings of its own.
pub use wasip2::http::types::Method;

/// Bytes moved per read or write: large enough that the host's calls stay
/// few, small enough that a body of any size runs in constant memory.
const CHUNK: u64 = 1 << 20;

/// The slowest upload rate assumed when a server answers only after the whole
/// body (a PUT): 100 ns per byte is 10 MB/s.
const NS_PER_UPLOADED_BYTE: u64 = 100;

/// What a request carries.
pub enum Body<'a> {
    Empty,
    /// A small body the plugin built itself (an entry line).
    Bytes(&'a [u8]),
    /// The next `size` bytes of a body the host hands over, copied as they
    /// are read; what follows is left in the stream for the next request
    /// (a chunk of a larger upload).
    Stream {
        from: &'a HostInput,
        size: u64,
    },
}

/// How requests are sent: the same limits and headers for each.
pub struct Client {
    timeout: Duration,
    headers: Vec<(String, Vec<u8>)>,
}

/// A response whose head has arrived; its body is read on demand.
pub struct Response {
    pub status: u16,
    pub content_length: Option<u64>,
    /// The response's header fields, names in lower case.
    headers: Vec<(String, Vec<u8>)>,
    // Fields drop in declaration order: a stream before its body, a body
    // before its response, the response before the future that produced it.
    stream: InputStream,
    _body: IncomingBody,
    _response: IncomingResponse,
    _future: FutureIncomingResponse,
    timeout: Duration,
    url: Url,
    what: String,
}

impl Client {
    /// `timeout` bounds connecting and every wait on a silent server.
    pub fn new(timeout: Duration) -> Self {
        Client { timeout, headers: Vec::new() }
    }

    /// Adds a header sent with every request (credentials, for instance).
    pub fn header(mut self, name: &str, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name.to_string(), value.into()));
        self
    }

    /// Sends `method url` with `body` and waits for the response head. `what`
    /// names the request in every error ("s3 at 127.0.0.1:7070: PUT b/key"):
    /// it must say which server, since the host shows the message alone.
    pub fn send(&self, method: Method, url: &Url, body: Body<'_>, what: &str) -> Result<Response, Error> {
        self.send_with(method, url, &[], body, what)
    }

    /// [`Client::send`] with `headers` added to this request alone: what
    /// differs per request (a signature over its date, a range, a token
    /// that is renewed).
    pub fn send_with(
        &self,
        method: Method,
        url: &Url,
        headers: &[(&str, String)],
        body: Body<'_>,
        what: &str,
    ) -> Result<Response, Error> {
        let length = match &body {
            Body::Empty => None,
            Body::Bytes(b) => Some(b.len() as u64),
            Body::Stream { size, .. } => Some(*size),
        };
        let mut list = self.headers.clone();
        list.extend(headers.iter().map(|(name, value)| (name.to_string(), value.clone().into_bytes())));
        // wasmtime refuses a body longer or shorter than the declared length,
        // so a short read from the host cannot store a truncated object.
        if let Some(n) = length {
            list.push(("content-length".to_string(), n.to_string().into_bytes()));
        }
        let headers = Fields::from_list(&list).map_err(|e| Error::broken(what, format!("building headers: {e:?}")))?;
        let request = OutgoingRequest::new(headers);
        let scheme = match url.scheme() {
            "http" => Scheme::Http,
            "https" => Scheme::Https,
            other => Scheme::Other(other.to_string()),
        };
        let rejected = |part: &str| Error::Broken(format!("{what}: wasi:http rejected the request's {part}"));
        request.set_method(&method).map_err(|()| rejected("method"))?;
        request.set_scheme(Some(&scheme)).map_err(|()| rejected("scheme"))?;
        request.set_authority(Some(authority(url))).map_err(|()| rejected("authority"))?;
        request
            .set_path_with_query(Some(&url[Position::BeforePath..Position::AfterQuery]))
            .map_err(|()| rejected("path"))?;
        // Only a request with a body gets one: an empty body stream would make
        // the host send a GET with chunked encoding, which some servers refuse.
        let outgoing = match length {
            Some(_) => Some(request.body().map_err(|()| rejected("body"))?),
            None => None,
        };

        let options = RequestOptions::new();
        let ns = nanos(self.timeout);
        // The host's first-byte limit runs while the body is still going up,
        // so it grows with the body. A host that refuses an option (or clamps
        // it to its own call limit) still bounds the call: not an error.
        let first_byte = ns.saturating_add(length.unwrap_or(0).saturating_mul(NS_PER_UPLOADED_BYTE));
        let _ = options.set_connect_timeout(Some(ns));
        let _ = options.set_first_byte_timeout(Some(first_byte));
        let _ = options.set_between_bytes_timeout(Some(ns));
        let future = outgoing_handler::handle(request, Some(options))
            .map_err(|e| Error::Unavailable(format!("{what}: {}", describe(&e, url, self.timeout))))?;

        // A server may answer (401, 413) without reading the whole body: the
        // write then fails, and its response says why better than the failure.
        let mut upload_failed = None;
        if let Some(outgoing) = outgoing {
            match self.upload(&outgoing, body, url) {
                Ok(()) => {
                    if let Err(e) = OutgoingBody::finish(outgoing, None) {
                        upload_failed = Some(format!("finishing the upload: {}", describe(&e, url, self.timeout)));
                    }
                }
                // The host's own stream failed: dropping the unfinished body
                // aborts the request, so no server ever sees a partial one.
                Err(UploadFailure::Local(e)) => return Err(Error::Broken(format!("{what}: {e}"))),
                Err(UploadFailure::Network(e)) => upload_failed = Some(e),
            }
        }

        let response = loop {
            // The exchange's own error is the cause, a failed upload its consequence.
            let failed = |cause: String| {
                Error::Unavailable(match &upload_failed {
                    None => format!("{what}: {cause}"),
                    Some(upload) => format!("{what}: {cause} ({upload})"),
                })
            };
            match future.get() {
                Some(Ok(Ok(response))) => break response,
                // A denied request never had a connection: whatever the upload
                // met on its way out says nothing more.
                Some(Ok(Err(e @ ErrorCode::HttpRequestDenied))) => {
                    return Err(Error::Unavailable(format!("{what}: {}", describe(&e, url, self.timeout))));
                }
                Some(Ok(Err(e))) => return Err(failed(describe(&e, url, self.timeout))),
                Some(Err(())) => return Err(Error::Broken(format!("{what}: wasi:http response taken twice"))),
                None => wait(&future.subscribe(), self.timeout, "waiting for the response").map_err(failed)?,
            }
        };
        let status = response.status();
        let headers: Vec<(String, Vec<u8>)> =
            response.headers().entries().into_iter().map(|(name, value)| (name.to_ascii_lowercase(), value)).collect();
        let content_length = headers
            .iter()
            .find(|(name, _)| name == "content-length")
            .and_then(|(_, v)| std::str::from_utf8(v).ok()?.trim().parse().ok());
        let body = response.consume().map_err(|()| Error::Broken(format!("{what}: response body taken twice")))?;
        let stream = body.stream().map_err(|()| Error::Broken(format!("{what}: response stream taken twice")))?;
        Ok(Response {
            status,
            content_length,
            headers,
            stream,
            _body: body,
            _response: response,
            _future: future,
            timeout: self.timeout,
            url: url.clone(),
            what: what.to_string(),
        })
    }

    /// Writes `body` into the request's body stream, which is dropped on
    /// return so that the body can be finished.
    fn upload(&self, outgoing: &OutgoingBody, body: Body<'_>, url: &Url) -> Result<(), UploadFailure> {
        let sink = outgoing.write().map_err(|()| UploadFailure::Local("request body stream taken twice".into()))?;
        match body {
            Body::Empty => Ok(()),
            Body::Bytes(bytes) => write_bounded(&sink, bytes, url, self.timeout),
            Body::Stream { from, size } => {
                let mut left = size;
                while left > 0 {
                    match from.blocking_read(left.min(CHUNK)) {
                        Ok(chunk) => {
                            write_bounded(&sink, &chunk, url, self.timeout)?;
                            left -= chunk.len() as u64;
                        }
                        // A body shorter than declared: wasmtime refuses to
                        // finish it, so no server stores a truncated object.
                        Err(HostStreamError::Closed) => return Ok(()),
                        Err(HostStreamError::LastOperationFailed(e)) => {
                            return Err(UploadFailure::Local(format!(
                                "reading the body from gocp failed: {}",
                                e.to_debug_string()
                            )));
                        }
                    }
                }
                Ok(())
            }
        }
    }
}

impl Response {
    /// The value of the header `name` (lower case), if it came and is text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    /// Copies the body into the host's `sink` and returns its length. Once
    /// more than `limit` bytes came it stops, without writing the excess: the
    /// caller compares the count with the length it expected.
    pub fn copy_to(&self, sink: &HostOutput, limit: u64) -> Result<u64, Error> {
        let mut total = 0u64;
        while let Some(chunk) = self.chunk(CHUNK, total)? {
            total += chunk.len() as u64;
            if total > limit {
                break;
            }
            gocp_plugin_sdk::write_all(sink, &chunk)?;
        }
        Ok(total)
    }

    /// Copies a body that must be exactly `size` bytes into the host's
    /// `sink` (`what` names the request in messages): a length that says
    /// otherwise is broken (the store holds something else), a body that
    /// ends early is unavailable (the transfer broke).
    pub fn body_into(&self, sink: &HostOutput, size: u64, what: &str) -> Result<(), Error> {
        if let Some(length) = self.content_length.filter(|&n| n != size) {
            return Err(Error::Broken(format!("{what}: the object has {length} bytes, the entry says {size}")));
        }
        // It stops before writing more than `size` bytes into the host's store.
        let copied = self.copy_to(sink, size)?;
        if copied != size {
            return Err(Error::Unavailable(format!("{what}: the download ended after {copied} of {size} bytes")));
        }
        Ok(())
    }

    /// At most `limit` bytes of the body (an entry line, an error document);
    /// the rest is left unread.
    pub fn bytes(&self, limit: usize) -> Result<Vec<u8>, Error> {
        let mut bytes = Vec::new();
        while bytes.len() < limit {
            match self.chunk((limit - bytes.len()) as u64, bytes.len() as u64)? {
                Some(chunk) => bytes.extend_from_slice(&chunk),
                None => break,
            }
        }
        Ok(bytes)
    }

    /// The next piece of the body, at most `max` bytes, `None` at its end;
    /// `so_far` is only for the message when the download fails.
    fn chunk(&self, max: u64, so_far: u64) -> Result<Option<Vec<u8>>, Error> {
        loop {
            match self.stream.read(max) {
                Ok(chunk) if chunk.is_empty() => {
                    let doing = format!("waiting for the response body after {so_far} bytes");
                    wait(&self.stream.subscribe(), self.timeout, &doing)
                        .map_err(|e| Error::Unavailable(format!("{}: {e}", self.what)))?
                }
                Ok(chunk) => return Ok(Some(chunk)),
                Err(StreamError::Closed) => return Ok(None),
                Err(StreamError::LastOperationFailed(e)) => {
                    return Err(Error::Unavailable(format!(
                        "{}: the response body failed after {so_far} bytes: {}",
                        self.what,
                        stream_failure(&e, &self.url, self.timeout)
                    )));
                }
            }
        }
    }
}

/// Why an upload stopped: the host's stream (the request must not go on) or
/// the network (the server's response may still say more).
enum UploadFailure {
    Local(String),
    Network(String),
}

/// Writes all of `bytes`, giving up when the server takes no data for `timeout`.
fn write_bounded(sink: &OutputStream, mut bytes: &[u8], url: &Url, timeout: Duration) -> Result<(), UploadFailure> {
    let failed = |e: StreamError| {
        UploadFailure::Network(match e {
            StreamError::Closed => "the connection closed while sending the body".into(),
            StreamError::LastOperationFailed(e) => format!("sending the body: {}", stream_failure(&e, url, timeout)),
        })
    };
    while !bytes.is_empty() {
        let permit = sink.check_write().map_err(failed)?;
        if permit == 0 {
            wait(&sink.subscribe(), timeout, "waiting for the server to take more of the body")
                .map_err(UploadFailure::Network)?;
            continue;
        }
        let n = permit.min(bytes.len() as u64) as usize;
        sink.write(&bytes[..n]).map_err(failed)?;
        bytes = &bytes[n..];
    }
    Ok(())
}

/// Blocks until `ready` fires or `timeout` passes; the error says what was
/// awaited.
fn wait(ready: &Pollable, timeout: Duration, doing: &str) -> Result<(), String> {
    let timer = subscribe_duration(nanos(timeout));
    if poll(&[ready, &timer]).contains(&0) { Ok(()) } else { Err(timed_out(doing, timeout)) }
}

fn timed_out(doing: &str, timeout: Duration) -> String {
    format!("timed out {doing} (timeout={})", humantime::format_duration(timeout))
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// `host[:port]` as the URL gives it: what the host's --allow-net gate checks.
fn authority(url: &Url) -> &str {
    &url[Position::BeforeHost..Position::AfterPort]
}

/// A failed stream's error: the wasi:http code when there is one.
fn stream_failure(e: &IoError, url: &Url, timeout: Duration) -> String {
    match wasip2::http::types::http_error_code(e) {
        Some(code) => describe(&code, url, timeout),
        None => e.to_debug_string(),
    }
}

/// A transport error in words a user can act on, naming the server.
fn describe(e: &ErrorCode, url: &Url, timeout: Duration) -> String {
    let authority = authority(url);
    match e {
        ErrorCode::HttpRequestDenied => {
            let host = url.host_str().unwrap_or(authority);
            let grant = match url.port_or_known_default() {
                Some(port) => format!("{host}:{port}"),
                None => authority.to_string(),
            };
            format!("gocp does not allow connecting to {authority}: grant it with --allow-net {grant}")
        }
        ErrorCode::ConnectionTimeout => timed_out(&format!("connecting to {authority}"), timeout),
        ErrorCode::ConnectionReadTimeout | ErrorCode::HttpResponseTimeout => {
            timed_out("waiting for the response", timeout)
        }
        ErrorCode::ConnectionWriteTimeout => timed_out("sending the request", timeout),
        ErrorCode::DnsTimeout => format!("timed out resolving {authority}"),
        ErrorCode::DnsError(p) => format!(
            "cannot resolve {authority} ({})",
            p.rcode.clone().or(p.info_code.map(|c| c.to_string())).unwrap_or_else(|| "no detail".into())
        ),
        ErrorCode::DestinationNotFound | ErrorCode::DestinationUnavailable => format!("{authority} cannot be reached"),
        ErrorCode::TlsCertificateError => format!(
            "the TLS certificate of {authority} is not trusted here (if a private CA signed it, give gocp-host its certificate with --ca-file FILE)"
        ),
        ErrorCode::TlsProtocolError | ErrorCode::TlsAlertReceived(_) => {
            format!("TLS with {authority} failed: {e:?}")
        }
        ErrorCode::ConnectionRefused => "connection refused (is the server running?)".into(),
        ErrorCode::ConnectionTerminated => "the server closed the connection".into(),
        ErrorCode::HttpResponseIncomplete => "the response ended early".into(),
        ErrorCode::HttpProtocolError => "the server does not speak HTTP as expected".into(),
        ErrorCode::InternalError(Some(m)) => m.clone(),
        other => format!("{other:?}"),
    }
}
