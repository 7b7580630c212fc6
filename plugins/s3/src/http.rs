//! One HTTP exchange over wasi:http, with bodies streamed both ways in bounded
//! chunks and every wait bounded by the configured timeout. It owns the
//! transport only: it must never interpret S3 (status codes and error
//! documents are the caller's) and never hold a whole body in memory.

use std::time::Duration;

use gocp_plugin_sdk::{Error, InputStream as HostInput, OutputStream as HostOutput, StreamError as HostStreamError};
use url::{Position, Url};
use wasip2::clocks::monotonic_clock;
use wasip2::http::outgoing_handler;
use wasip2::http::types::{
    ErrorCode, Fields, IncomingBody, IncomingResponse, Method, OutgoingBody, OutgoingRequest, RequestOptions, Scheme,
};
use wasip2::io::poll::{Pollable, poll};
use wasip2::io::streams::{InputStream, OutputStream, StreamError};

/// Bytes moved per read or write: large enough that a call per chunk costs
/// nothing, small enough that a body of any size runs in constant memory.
const CHUNK: u64 = 1 << 20;

/// What a request carries.
pub enum Body<'a> {
    Empty,
    /// Small bodies built by the plugin itself (an entry line).
    Bytes(&'a [u8]),
    /// A body the host hands over, `size` bytes, copied as it is read.
    Stream {
        from: &'a HostInput,
        size: u64,
    },
}

/// A response whose body has not been read yet.
pub struct Response {
    pub status: u16,
    pub content_length: Option<u64>,
    // Declared child first: wasi:http requires a stream to be dropped before
    // its body, and the body before its response.
    stream: InputStream,
    _body: IncomingBody,
    _response: IncomingResponse,
}

/// Sends one request and waits for the response head. `what` names the
/// request in messages ("s3 at 127.0.0.1:7070: PUT gocp/cas/ab12..").
pub fn send(method: Method, url: &Url, body: Body, timeout: Duration, what: &str) -> Result<Response, Error> {
    let length = match &body {
        Body::Empty => None,
        Body::Bytes(b) => Some(b.len() as u64),
        Body::Stream { size, .. } => Some(*size),
    };
    let headers = match length {
        // wasmtime refuses a body longer or shorter than a declared length,
        // so a short read from the host cannot store a truncated object.
        Some(n) => Fields::from_list(&[("content-length".to_string(), n.to_string().into_bytes())])
            .map_err(|e| Error::broken(what, format!("building headers: {e}")))?,
        None => Fields::new(),
    };
    let request = OutgoingRequest::new(headers);
    let scheme = if url.scheme() == "https" { Scheme::Https } else { Scheme::Http };
    let set = [
        request.set_method(&method),
        request.set_scheme(Some(&scheme)),
        request.set_authority(Some(&url[Position::BeforeHost..Position::AfterPort])),
        request.set_path_with_query(Some(&url[Position::BeforePath..Position::AfterQuery])),
    ];
    if set.iter().any(Result::is_err) {
        return Err(Error::Broken(format!("{what}: wasi:http rejected the request line for {url}")));
    }
    let options = RequestOptions::new();
    let ns = timeout.as_nanos().min(u64::MAX as u128) as u64;
    // For a PUT the first response byte comes only after the whole upload, so
    // its wait grows with the body, at an assumed floor of 10 MiB/s. A host that
    // cannot honour a timeout (or clamps it to its own call limit) still bounds
    // the call, so a refused option is not an error.
    let first_byte = ns.saturating_add(length.unwrap_or(0).saturating_mul(100));
    let _ = options.set_connect_timeout(Some(ns));
    let _ = options.set_first_byte_timeout(Some(first_byte));
    let _ = options.set_between_bytes_timeout(Some(ns));

    let out_body = request.body().map_err(|()| Error::Broken(format!("{what}: request body taken twice")))?;
    let pending = outgoing_handler::handle(request, Some(options))
        .map_err(|e| Error::Unavailable(format!("{what}: {}", describe(&e, url, timeout))))?;
    let upload = match body {
        Body::Empty => Ok(()),
        Body::Bytes(bytes) => upload(&out_body, |sink| write_bounded(sink, bytes, timeout)),
        Body::Stream { from, .. } => upload(&out_body, |sink| copy_from_host(from, sink, timeout)),
    };
    let upload = upload.and_then(|()| {
        OutgoingBody::finish(out_body, None)
            .map_err(|e| format!("finishing the upload: {}", describe(&e, url, timeout)))
    });

    pending.subscribe().block();
    let response = match pending.get() {
        Some(Ok(Ok(response))) => response,
        // A server that answers before reading the whole upload (a refusal)
        // still gives a response above. Without one, the request's own error
        // is the cause and a failed upload its consequence.
        Some(Ok(Err(e))) => {
            let cause = describe(&e, url, timeout);
            return Err(Error::Unavailable(match upload {
                Ok(()) => format!("{what}: {cause}"),
                Err(upload) => format!("{what}: {cause} ({upload})"),
            }));
        }
        Some(Err(())) | None => return Err(Error::Broken(format!("{what}: wasi:http response read twice"))),
    };
    let status = response.status();
    let content_length =
        response.headers().get("content-length").first().and_then(|v| std::str::from_utf8(v).ok()?.trim().parse().ok());
    let body = response.consume().map_err(|()| Error::Broken(format!("{what}: response body taken twice")))?;
    let stream = body.stream().map_err(|()| Error::Broken(format!("{what}: response stream taken twice")))?;
    Ok(Response { status, content_length, stream, _body: body, _response: response })
}

impl Response {
    /// Copies the body into the host's sink; returns the number of bytes.
    pub fn copy_to(&self, sink: &HostOutput, what: &str) -> Result<u64, Error> {
        let mut total = 0u64;
        loop {
            match self.stream.blocking_read(CHUNK) {
                Ok(chunk) => {
                    gocp_plugin_sdk::write_all(sink, &chunk)?;
                    total += chunk.len() as u64;
                }
                Err(StreamError::Closed) => return Ok(total),
                Err(StreamError::LastOperationFailed(e)) => {
                    return Err(Error::Unavailable(format!(
                        "{what}: the download failed after {total} bytes: {}",
                        e.to_debug_string()
                    )));
                }
            }
        }
    }

    /// Reads at most `limit` bytes of the body as text (an entry, an error
    /// document); the rest is left unread.
    pub fn text(&self, limit: usize, what: &str) -> Result<String, Error> {
        let mut bytes = Vec::new();
        while bytes.len() < limit {
            match self.stream.blocking_read((limit - bytes.len()) as u64) {
                Ok(chunk) => bytes.extend_from_slice(&chunk),
                Err(StreamError::Closed) => break,
                Err(StreamError::LastOperationFailed(e)) => {
                    return Err(Error::Unavailable(format!(
                        "{what}: reading the response failed: {}",
                        e.to_debug_string()
                    )));
                }
            }
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}

/// Runs `write` against the request body's stream, then flushes it.
fn upload(out_body: &OutgoingBody, write: impl FnOnce(&OutputStream) -> Result<(), String>) -> Result<(), String> {
    let sink = out_body.write().map_err(|()| "request body stream taken twice".to_string())?;
    write(&sink)?;
    sink.flush().map_err(|e| format!("sending the body: {}", stream_error(e)))?;
    Ok(())
}

fn copy_from_host(from: &HostInput, sink: &OutputStream, timeout: Duration) -> Result<(), String> {
    loop {
        match from.blocking_read(CHUNK) {
            Ok(chunk) => write_bounded(sink, &chunk, timeout)?,
            Err(HostStreamError::Closed) => return Ok(()),
            Err(HostStreamError::LastOperationFailed(e)) => {
                return Err(format!("reading the body from gocp: {}", e.to_debug_string()));
            }
        }
    }
}

/// Writes all of `bytes`, giving up when the server takes no data for `timeout`.
fn write_bounded(sink: &OutputStream, mut bytes: &[u8], timeout: Duration) -> Result<(), String> {
    while !bytes.is_empty() {
        let permit = sink.check_write().map_err(|e| format!("sending the body: {}", stream_error(e)))?;
        if permit == 0 {
            wait(&sink.subscribe(), timeout)
                .map_err(|()| format!("the server took no data for {}", humanize(timeout)))?;
            continue;
        }
        let n = (permit as usize).min(bytes.len());
        sink.write(&bytes[..n]).map_err(|e| format!("sending the body: {}", stream_error(e)))?;
        bytes = &bytes[n..];
    }
    Ok(())
}

/// Blocks until `ready` fires or `timeout` passes (`Err`).
fn wait(ready: &Pollable, timeout: Duration) -> Result<(), ()> {
    let timer = monotonic_clock::subscribe_duration(timeout.as_nanos().min(u64::MAX as u128) as u64);
    if poll(&[ready, &timer]).contains(&0) { Ok(()) } else { Err(()) }
}

fn stream_error(e: StreamError) -> String {
    match e {
        StreamError::Closed => "the connection was closed".into(),
        StreamError::LastOperationFailed(e) => e.to_debug_string(),
    }
}

fn humanize(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// A transport error in words a user can act on.
fn describe(e: &ErrorCode, url: &Url, timeout: Duration) -> String {
    let authority = &url[Position::BeforeHost..Position::AfterPort];
    match e {
        ErrorCode::HttpRequestDenied => {
            let port = url.port_or_known_default().unwrap_or(443);
            let host = url.host_str().unwrap_or(authority);
            format!("gocp does not allow connecting to {authority}: grant it with --allow-net {host}:{port}")
        }
        ErrorCode::ConnectionRefused => "connection refused".into(),
        ErrorCode::ConnectionTerminated => "the connection was closed by the server".into(),
        ErrorCode::ConnectionTimeout => {
            format!("could not connect within {} (see --config timeout=)", humanize(timeout))
        }
        ErrorCode::ConnectionReadTimeout | ErrorCode::HttpResponseTimeout => {
            format!("the server did not answer within {} (see --config timeout=)", humanize(timeout))
        }
        ErrorCode::ConnectionWriteTimeout => "sending to the server timed out".into(),
        ErrorCode::DnsTimeout | ErrorCode::DnsError(_) | ErrorCode::DestinationNotFound => {
            format!("cannot resolve {authority}: {e:?}")
        }
        ErrorCode::TlsCertificateError | ErrorCode::TlsProtocolError | ErrorCode::TlsAlertReceived(_) => {
            format!("TLS with {authority} failed: {e:?}")
        }
        other => format!("{other:?}"),
    }
}
