//! How a plugin's wasi:http requests reach the network, once the sandbox has
//! let them through (`sandbox::HttpGate`): over connections kept open and
//! reused, and TLS that trusts what the machine trusts.
//!
//! A remote cache is a chain of small requests: opening a connection for each
//! costs a round trip (and a TLS handshake: two more) before the request can
//! even start, which on a link 20 ms away is most of a request's time. So
//! connections are pooled per scheme and authority, shared by every instance
//! of the plugin: a request takes an idle connection if there is one, else
//! opens one; a connection whose response was read to its end goes back to
//! the pool, at most [`MAX_IDLE`] per authority, for at most [`IDLE_FOR`].
//!
//! TLS trusts the system's root store (what `SSL_CERT_FILE` or
//! `SSL_CERT_DIR` name, when set), the CA certificates given with
//! `--ca-file`, and the Mozilla roots built into the binary when the system
//! has none. A certificate that is not trusted reaches the plugin as a
//! certificate error (not a protocol one), so that it can say what to change.
//!
//! It owns the connections; it never decides whether a request is allowed.

use std::collections::HashMap;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use bytes::Bytes;
use http::uri::Scheme;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::client::conn::http1::SendRequest;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody};

/// Idle connections kept per authority: as many as instances run at once.
const MAX_IDLE: usize = 32;
/// An idle connection older than this is closed rather than reused: servers
/// close idle connections too, and a request sent on one they closed fails.
const IDLE_FOR: Duration = Duration::from_secs(30);

trait Stream: AsyncRead + AsyncWrite + Send + Sync + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Sync + Unpin + 'static> Stream for T {}

type Key = (bool, String);
/// Idle connections, each with when it went idle, by scheme and authority.
type Idle = HashMap<Key, Vec<(SendRequest<WasiBody>, Instant)>>;

/// The connections of one plugin, and how it speaks TLS.
pub struct Egress {
    idle: Mutex<Idle>,
    /// Certificates from `--ca-file`, read when gocp starts (so that a
    /// mistake in one fails the start); the system's store is read only
    /// when the first TLS connection is made: plugins that never speak TLS
    /// never pay for it.
    extra_roots: Vec<CertificateDer<'static>>,
    tls: OnceLock<tokio_rustls::TlsConnector>,
    /// Connections opened, and requests sent, for statistics and tests.
    pub opened: AtomicU64,
    pub requests: AtomicU64,
}

impl Egress {
    /// Reads the PEM certificates in `ca_files`, to trust besides the
    /// system's roots.
    pub fn new(ca_files: &[impl AsRef<Path>]) -> Result<Egress> {
        let mut extra_roots = Vec::new();
        for file in ca_files {
            let file = file.as_ref();
            let before = extra_roots.len();
            for cert in CertificateDer::pem_file_iter(file).map_err(|e| anyhow!("--ca-file {}: {e}", file.display()))? {
                let cert = cert.map_err(|e| anyhow!("--ca-file {}: {e}", file.display()))?;
                rustls::RootCertStore::empty()
                    .add(cert.clone())
                    .map_err(|e| anyhow!("--ca-file {}: {e}", file.display()))?;
                extra_roots.push(cert);
            }
            if extra_roots.len() == before {
                bail!("--ca-file {}: no PEM certificate in it", file.display());
            }
        }
        Ok(Egress {
            idle: Mutex::new(HashMap::new()),
            extra_roots,
            tls: OnceLock::new(),
            opened: AtomicU64::new(0),
            requests: AtomicU64::new(0),
        })
    }

    fn tls(&self) -> &tokio_rustls::TlsConnector {
        self.tls.get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            // A system store may hold certificates rustls cannot use; the
            // others still count.
            let _ = roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            if roots.is_empty() {
                roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            }
            roots.add_parsable_certificates(self.extra_roots.iter().cloned());
            let config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
            tokio_rustls::TlsConnector::from(Arc::new(config))
        })
    }

    /// Sends `request` over a pooled connection, or a new one.
    pub async fn send(
        self: Arc<Self>,
        mut request: http::Request<WasiBody>,
        options: RequestOptions,
    ) -> Result<http::Response<WasiBody>, Error> {
        let uri = request.uri();
        let tls = uri.scheme() == Some(&Scheme::HTTPS);
        let authority = uri.authority().ok_or(Error::HttpRequestUriInvalid)?;
        let authority = match authority.port() {
            Some(_) => authority.to_string(),
            None => format!("{authority}:{}", if tls { 443 } else { 80 }),
        };
        // The request line carries only the path: the authority went into the Host header.
        let path = request.uri().path_and_query().map_or("/", |p| p.as_str()).to_string();
        *request.uri_mut() = http::Uri::try_from(path).map_err(|_| Error::HttpRequestUriInvalid)?;
        let key = (tls, authority);
        self.requests.fetch_add(1, Ordering::Relaxed);

        let connect_timeout = options.connect_timeout.unwrap_or(Duration::from_secs(600));
        let first_byte = options.first_byte_timeout.unwrap_or(Duration::from_secs(600));
        let between_bytes = options.between_bytes_timeout.unwrap_or(Duration::from_secs(600)).max(Duration::new(0, 1));
        let mut sender = match self.take_idle(&key).await {
            Some(sender) => sender,
            None => self.connect(&key, connect_timeout).await?,
        };
        let response = tokio::time::timeout(first_byte, sender.send_request(request))
            .await
            .map_err(|_| Error::ConnectionReadTimeout)?
            .map_err(Error::from)?;
        let mut idle_timer = tokio::time::interval(between_bytes);
        idle_timer.reset();
        let mut back = Some((sender, self.clone(), key));
        if response.body().is_end_stream() {
            // No body to read (a HEAD, a 204): nobody will poll it to its end.
            if let Some((sender, egress, key)) = back.take() {
                egress.put_back(key, sender);
            }
        }
        Ok(response.map(|incoming| PooledBody { incoming: Some(incoming), idle_timer, back }.boxed_unsync()))
    }

    /// An idle connection to `key` that is still open and ready for a
    /// request, if there is one.
    async fn take_idle(&self, key: &Key) -> Option<SendRequest<WasiBody>> {
        loop {
            let (mut sender, since) = self.idle.lock().unwrap().get_mut(key)?.pop()?;
            if since.elapsed() > IDLE_FOR || sender.is_closed() {
                continue;
            }
            // A connection goes back to the pool as its last response ends,
            // a moment before hyper marks it ready for the next.
            if let Ok(Ok(())) = tokio::time::timeout(Duration::from_millis(100), sender.ready()).await {
                return Some(sender);
            }
        }
    }

    async fn connect(&self, key: &Key, timeout: Duration) -> Result<SendRequest<WasiBody>, Error> {
        let (tls, authority) = key;
        let tcp = match tokio::time::timeout(timeout, TcpStream::connect(authority)).await {
            Ok(stream) => stream.map_err(Error::Connect)?,
            Err(_) => return Err(Error::ConnectionTimeout),
        };
        let _ = tcp.set_nodelay(true);
        let stream: Box<dyn Stream> = if *tls {
            let host = authority.rsplit_once(':').map_or(authority.as_str(), |(h, _)| h);
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let name = rustls::pki_types::ServerName::try_from(host.to_string())
                .map_err(|e| Error::Tls(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
            let handshake = self.tls().connect(name, tcp);
            match tokio::time::timeout(timeout, handshake).await {
                Ok(Ok(stream)) => Box::new(stream),
                Ok(Err(e)) => return Err(Error::Tls(e)),
                Err(_) => return Err(Error::ConnectionTimeout),
            }
        } else {
            Box::new(tcp)
        };
        let io = wasmtime_wasi_http::io::TokioIo::new(stream);
        let (sender, connection) =
            tokio::time::timeout(timeout, hyper::client::conn::http1::Builder::new().handshake(io))
                .await
                .map_err(|_| Error::ConnectionTimeout)??;
        // The connection runs on its own for as long as a request or the
        // pool holds its sender. (This runs on wasmtime-wasi's runtime.)
        tokio::task::spawn(async move {
            let _ = connection.await;
        });
        self.opened.fetch_add(1, Ordering::Relaxed);
        Ok(sender)
    }

    fn put_back(&self, key: Key, sender: SendRequest<WasiBody>) {
        let mut idle = self.idle.lock().unwrap();
        let list = idle.entry(key).or_default();
        if list.len() < MAX_IDLE {
            list.push((sender, Instant::now()));
        }
    }
}

/// Whether a TLS failure is the server's certificate not being trusted (or
/// not valid), rather than the protocol failing: that one the user can fix,
/// with `--ca-file`.
pub fn is_certificate_error(e: &std::io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|e| matches!(e, rustls::Error::InvalidCertificate(_)))
}

/// The most of a response body left unread that is still read to its end
/// when the plugin drops it, to keep its connection: a miss's short "not
/// found" page, say. Anything longer costs less to reconnect than to read.
const DRAIN_AT_MOST: u64 = 16 * 1024;
/// How long draining such a body may take before its connection is closed.
const DRAIN_FOR: Duration = Duration::from_secs(5);

/// A response body that hands its connection back to the pool once read to
/// its end, and fails when the server goes silent between bytes.
struct PooledBody {
    /// Taken only when dropped.
    incoming: Option<hyper::body::Incoming>,
    idle_timer: tokio::time::Interval,
    back: Option<(SendRequest<WasiBody>, Arc<Egress>, Key)>,
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let Some(incoming) = self.incoming.as_mut() else { return Poll::Ready(None) };
        match Pin::new(incoming).poll_frame(cx) {
            Poll::Ready(None) => {
                if let Some((sender, egress, key)) = self.back.take() {
                    egress.put_back(key, sender);
                }
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                self.back = None;
                Poll::Ready(Some(Err(if e.is_timeout() { Error::HttpResponseTimeout } else { Error::from(e) })))
            }
            Poll::Ready(Some(Ok(frame))) => {
                self.idle_timer.reset();
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending => {
                if self.idle_timer.poll_tick(cx).is_ready() {
                    self.back = None;
                    return Poll::Ready(Some(Err(Error::ConnectionReadTimeout)));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.as_ref().is_none_or(|incoming| incoming.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.incoming.as_ref().map_or_else(|| SizeHint::with_exact(0), |incoming| incoming.size_hint())
    }
}

impl Drop for PooledBody {
    /// A body dropped before its end (a plugin that reads a 404's status and
    /// not its page) still returns its connection when little is left: read
    /// in the background, it costs no round trip, a new connection costs one.
    fn drop(&mut self) {
        let (Some(back), Some(mut incoming)) = (self.back.take(), self.incoming.take()) else { return };
        if incoming.size_hint().upper().is_none_or(|left| left > DRAIN_AT_MOST) {
            return;
        }
        let drained = async move {
            while let Some(frame) = incoming.frame().await {
                frame.ok()?;
            }
            Some(())
        };
        wasmtime_wasi::runtime::with_ambient_tokio_runtime(|| {
            tokio::task::spawn(async move {
                if let Ok(Some(())) = tokio::time::timeout(DRAIN_FOR, drained).await {
                    let (sender, egress, key) = back;
                    egress.put_back(key, sender);
                }
            })
        });
    }
}
