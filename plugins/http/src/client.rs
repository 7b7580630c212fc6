//! One HTTP exchange over wasi:http: a request with an optional streamed body,
//! and a response whose body is read in bounded chunks.
//!
//! It owns the order in which wasi:http resources are created and dropped
//! (a child resource dropped after its parent makes the host trap) and the
//! time limits on every wait. It knows nothing about caches: no paths, no
//! status codes, and it must never hold a whole body in memory.

use std::time::Duration;

use gocp_plugin_sdk::Error;
use wasip2::clocks::monotonic_clock::subscribe_duration;
use wasip2::http::outgoing_handler;
use wasip2::http::types::{
    ErrorCode, FutureIncomingResponse, IncomingBody, IncomingResponse, Method, OutgoingBody, OutgoingRequest,
    RequestOptions, Scheme,
};
use wasip2::io::poll::{Pollable, poll};
use wasip2::io::streams::{InputStream, OutputStream, StreamError};

/// How much is read or written per step: large enough to keep the host's
/// calls few, small enough that memory stays flat for any body size.
pub const CHUNK: u64 = 1 << 20;

/// Where requests go and how long any single wait may last.
pub struct Client {
    pub scheme: Scheme,
    /// `host[:port]` exactly as the URL gave it: what the host's --allow-net
    /// gate checks.
    pub authority: String,
    /// The `Authorization` header, if credentials were configured.
    pub authorization: Option<String>,
    pub timeout: Duration,
    /// `host:port` with the scheme's default port filled in: what the user
    /// must pass to --allow-net.
    pub grant: String,
}

/// A request body: an entry line from memory, or a body streamed from the host.
pub enum Upload<'a> {
    Bytes(&'a [u8]),
    Stream { size: u64, source: &'a gocp_plugin_sdk::InputStream },
}

/// Why an exchange failed, before any status code was seen.
pub enum Failure {
    /// The request did not get an answer: refused, reset, timed out, denied.
    Network(String),
    /// Reading the host's body stream failed: not the server's fault.
    Local(Error),
}

/// A response whose headers have arrived.
pub struct Response {
    pub status: u16,
    pub content_length: Option<u64>,
    // Fields drop in declaration order: a stream before its body, a body
    // before its response, the response before the future that produced it.
    stream: Option<InputStream>,
    _body: Option<IncomingBody>,
    response: IncomingResponse,
    _future: FutureIncomingResponse,
    timeout: Duration,
}

impl Client {
    /// Sends `method path` with `upload` as its body and waits for the
    /// response headers.
    pub fn send(&self, method: Method, path: &str, upload: Option<Upload<'_>>) -> Result<Response, Failure> {
        let headers = wasip2::http::types::Fields::new();
        let header = |name: &str, value: &[u8]| {
            headers.append(name, value).map_err(|e| Failure::Local(Error::broken(&format!("header {name}"), e)))
        };
        if let Some(auth) = &self.authorization {
            header("authorization", auth.as_bytes())?;
        }
        let size = match &upload {
            None => None,
            Some(Upload::Bytes(b)) => Some(b.len() as u64),
            Some(Upload::Stream { size, .. }) => Some(*size),
        };
        if let Some(size) = size {
            header("content-length", size.to_string().as_bytes())?;
        }
        let request = OutgoingRequest::new(headers);
        let bad_request = |what: &str| Failure::Local(Error::Broken(format!("wasi:http refused the request's {what}")));
        request.set_method(&method).map_err(|()| bad_request("method"))?;
        request.set_scheme(Some(&self.scheme)).map_err(|()| bad_request("scheme"))?;
        request.set_authority(Some(&self.authority)).map_err(|()| bad_request("authority"))?;
        request.set_path_with_query(Some(path)).map_err(|()| bad_request("path"))?;
        let outgoing = match upload {
            Some(_) => Some(request.body().map_err(|()| bad_request("body"))?),
            None => None,
        };

        let options = RequestOptions::new();
        let ns = u64::try_from(self.timeout.as_nanos()).unwrap_or(u64::MAX);
        // A host that does not support one of these keeps its own limit, which is fine.
        let _ = options.set_connect_timeout(Some(ns));
        let _ = options.set_first_byte_timeout(Some(ns));
        let _ = options.set_between_bytes_timeout(Some(ns));
        let future = outgoing_handler::handle(request, Some(options)).map_err(|e| self.network(&e))?;

        // A server may answer (401, 413) without reading the whole body: then
        // the write fails, and the response says why better than the write error.
        let mut write_failed = None;
        if let (Some(outgoing), Some(upload)) = (outgoing, upload) {
            match self.write_body(&outgoing, upload) {
                Ok(()) => {
                    if let Err(e) = OutgoingBody::finish(outgoing, None) {
                        write_failed = Some(self.network(&e));
                    }
                }
                Err(Failure::Local(e)) => return Err(Failure::Local(e)),
                Err(network) => write_failed = Some(network),
            }
        }

        let response = loop {
            match future.get() {
                Some(Ok(Ok(response))) => break response,
                // The exchange's own error says more than a failed write: prefer it.
                Some(Ok(Err(e))) => return Err(self.network(&e)),
                Some(Err(())) => return Err(Failure::Local(Error::Broken("response taken twice".into()))),
                None => {
                    if let Err(e) = wait(&future.subscribe(), self.timeout, "the response") {
                        return Err(write_failed.unwrap_or(e));
                    }
                }
            }
        };
        let status = response.status();
        let content_length = response
            .headers()
            .get("content-length")
            .first()
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.trim().parse().ok());
        Ok(Response {
            status,
            content_length,
            stream: None,
            _body: None,
            response,
            _future: future,
            timeout: self.timeout,
        })
    }

    fn network(&self, e: &ErrorCode) -> Failure {
        match e {
            ErrorCode::HttpRequestDenied => {
                Failure::Network(format!("not granted: grant it with --allow-net {}", self.grant))
            }
            e => Failure::Network(describe(e)),
        }
    }

    fn write_body(&self, outgoing: &OutgoingBody, upload: Upload<'_>) -> Result<(), Failure> {
        let sink = outgoing.write().map_err(|()| Failure::Local(Error::Broken("request body taken twice".into())))?;
        match upload {
            Upload::Bytes(bytes) => write_all(&sink, bytes, self.timeout),
            Upload::Stream { source, .. } => loop {
                match source.blocking_read(CHUNK) {
                    Ok(chunk) => write_all(&sink, &chunk, self.timeout)?,
                    Err(gocp_plugin_sdk::StreamError::Closed) => return Ok(()),
                    Err(gocp_plugin_sdk::StreamError::LastOperationFailed(e)) => {
                        return Err(Failure::Local(Error::broken(
                            "reading the body from the host",
                            e.to_debug_string(),
                        )));
                    }
                }
            },
        }
    }
}

impl Response {
    /// The next chunk of the response body, `None` at its end.
    pub fn read(&mut self) -> Result<Option<Vec<u8>>, Failure> {
        if self.stream.is_none() {
            let body =
                self.response.consume().map_err(|()| Failure::Local(Error::Broken("body taken twice".into())))?;
            let stream = body.stream().map_err(|()| Failure::Local(Error::Broken("body stream taken twice".into())))?;
            self._body = Some(body);
            self.stream = Some(stream);
        }
        let stream = self.stream.as_ref().expect("set above");
        loop {
            match stream.read(CHUNK) {
                Ok(chunk) if chunk.is_empty() => wait(&stream.subscribe(), self.timeout, "the response body")?,
                Ok(chunk) => return Ok(Some(chunk)),
                Err(StreamError::Closed) => return Ok(None),
                Err(StreamError::LastOperationFailed(e)) => {
                    let why = wasip2::http::types::http_error_code(&e)
                        .map(|c| describe(&c))
                        .unwrap_or_else(|| e.to_debug_string());
                    return Err(Failure::Network(format!("reading the response body: {why}")));
                }
            }
        }
    }
}

/// Writes all of `bytes` into a network stream, waiting at most `timeout`
/// each time the server stops taking data.
fn write_all(sink: &OutputStream, mut bytes: &[u8], timeout: Duration) -> Result<(), Failure> {
    let failed = |e: StreamError| match e {
        StreamError::Closed => Failure::Network("the connection closed while sending the body".into()),
        StreamError::LastOperationFailed(e) => Failure::Network(format!(
            "sending the body: {}",
            wasip2::http::types::http_error_code(&e).map(|c| describe(&c)).unwrap_or_else(|| e.to_debug_string())
        )),
    };
    while !bytes.is_empty() {
        let permit = sink.check_write().map_err(failed)?;
        if permit == 0 {
            wait(&sink.subscribe(), timeout, "the server to take more of the body")?;
            continue;
        }
        let n = permit.min(bytes.len() as u64) as usize;
        sink.write(&bytes[..n]).map_err(failed)?;
        bytes = &bytes[n..];
    }
    Ok(())
}

/// Blocks until `ready` fires or `timeout` passes.
fn wait(ready: &Pollable, timeout: Duration, what: &str) -> Result<(), Failure> {
    let timer = subscribe_duration(u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX));
    if poll(&[ready, &timer]).contains(&0) {
        Ok(())
    } else {
        Err(Failure::Network(format!("timed out after {} waiting for {what}", humanize(timeout))))
    }
}

pub fn humanize(d: Duration) -> String {
    if d.subsec_nanos() == 0 { format!("{}s", d.as_secs()) } else { format!("{}ms", d.as_millis()) }
}

/// A wasi:http error in words a user can act on.
fn describe(e: &ErrorCode) -> String {
    match e {
        ErrorCode::ConnectionRefused => "connection refused (is the server running?)".into(),
        ErrorCode::ConnectionTerminated => "connection closed by the server".into(),
        ErrorCode::ConnectionTimeout => "timed out connecting".into(),
        ErrorCode::ConnectionReadTimeout | ErrorCode::HttpResponseTimeout => "timed out waiting for the answer".into(),
        ErrorCode::ConnectionWriteTimeout => "timed out sending".into(),
        ErrorCode::DnsTimeout => "timed out resolving the host name".into(),
        ErrorCode::DnsError(p) => format!(
            "cannot resolve the host name ({})",
            p.rcode.clone().or(p.info_code.map(|c| c.to_string())).unwrap_or_else(|| "no detail".into())
        ),
        ErrorCode::DestinationNotFound | ErrorCode::DestinationUnavailable => "the server cannot be reached".into(),
        ErrorCode::TlsCertificateError => "the server's TLS certificate was not accepted".into(),
        ErrorCode::TlsProtocolError | ErrorCode::TlsAlertReceived(_) => "TLS handshake failed".into(),
        ErrorCode::HttpResponseIncomplete => "the answer ended early".into(),
        ErrorCode::HttpProtocolError => "the server does not speak HTTP as expected".into(),
        ErrorCode::InternalError(Some(m)) => m.clone(),
        other => other.to_string(),
    }
}
