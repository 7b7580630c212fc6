//! What a plugin instance can reach, and how much it may use.
//!
//! Deny by default: a plugin sees its own `/state` directory and nothing else
//! unless the user granted it: directories (`--allow-dir`), environment
//! variables by name (`--allow-env`), network peers by host and port
//! (`--allow-net`, enforced both for wasi:http, on the request's authority,
//! and for wasi:sockets TCP, on the addresses the granted names resolve to).
//! Name lookups are limited to the granted names: a lookup is a message to
//! whoever runs the DNS, and an arbitrary name could carry a granted secret.
//! Nothing is resolved before the plugin needs it, so a go command never
//! waits on DNS to start. Its stdout goes nowhere;
//! its stderr reaches the user's terminal only when asked for, each line
//! prefixed with the plugin's name. Memory is capped per instance.
//!
//! It owns building each instance's WASI context from those grants; it must
//! never widen a grant (a refused request is refused, not retried elsewhere).

use std::collections::HashMap;
use std::future::Future;
use std::io::Write;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use wasmtime::StoreLimits;
use wasmtime::component::{Linker, Resource};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::Network;
use wasmtime_wasi::p2::bindings::sockets::ip_name_lookup::Host as _;
use wasmtime_wasi::p2::bindings::sockets::network::ErrorCode;
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};
use wasmtime_wasi::sockets::SocketAddrUse;
use wasmtime_wasi::sockets::WasiSocketsView;
use wasmtime_wasi::{FsPerms, WasiCtx};
use wasmtime_wasi_http::{RequestOptions, WasiBody, WasiHttpHooks};

use super::egress::Egress;

/// A directory the user grants a plugin (`--allow-dir`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirGrant {
    pub host: PathBuf,
    pub guest: String,
    pub read_only: bool,
}

/// A network peer the user grants a plugin (`--allow-net HOST:PORT`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetGrant {
    pub host: String,
    pub port: u16,
}

impl NetGrant {
    pub fn parse(s: &str) -> Result<NetGrant, String> {
        let bad = || format!("expected HOST:PORT, got {s:?}");
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let host = normal_host(host);
        if host.is_empty() {
            return Err(bad());
        }
        let port = port.parse().map_err(|_| bad())?;
        Ok(NetGrant { host, port })
    }
}

/// A host name as grants compare it: lower case, without IPv6 brackets or
/// the root's trailing dot.
fn normal_host(host: &str) -> String {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase()
}

/// Everything the user granted a plugin, and its limits.
#[derive(Debug, Clone)]
pub struct Grants {
    pub dirs: Vec<DirGrant>,
    /// Names of host environment variables the plugin may read.
    pub env: Vec<String>,
    pub net: Vec<NetGrant>,
    /// Linear memory per instance, in bytes.
    pub memory: usize,
    /// Prefix for the plugin's stderr lines, or None to discard them.
    pub stderr_prefix: Option<String>,
}

/// The grants prepared once per plugin (environment values read), so that
/// each new instance is cheap to set up.
pub struct Sandbox {
    state_dir: PathBuf,
    grants: Grants,
    env: Vec<(String, String)>,
    net: Arc<NetPolicy>,
    egress: Arc<Egress>,
}

struct NetPolicy {
    /// `host:port` pairs, for wasi:http requests (matched before any lookup).
    authorities: Vec<NetGrant>,
    /// What each granted `host:port` resolved to, for wasi:sockets TCP
    /// connects: looked up at the first connect that needs it, once.
    resolved: Mutex<HashMap<(String, u16), Vec<SocketAddr>>>,
    /// Longest a wasi:http request may wait to connect or between bytes.
    timeout: Duration,
    /// Connections refused (HTTP requests and TCP connects), for statistics.
    denied: AtomicU64,
}

impl Sandbox {
    pub fn new(state_dir: PathBuf, grants: Grants, timeout: Duration, egress: Arc<Egress>) -> Sandbox {
        let env = grants.env.iter().filter_map(|name| std::env::var(name).ok().map(|v| (name.clone(), v))).collect();
        let net = Arc::new(NetPolicy {
            authorities: grants.net.clone(),
            resolved: Mutex::new(HashMap::new()),
            timeout,
            denied: AtomicU64::new(0),
        });
        Sandbox { state_dir, grants, env, net, egress }
    }

    /// Over all instances: connections refused, HTTP connections opened and
    /// requests sent.
    pub fn network(&self) -> crate::backend::Network {
        crate::backend::Network {
            denials: self.net.denied.load(Ordering::Relaxed),
            http_connections: self.egress.opened.load(Ordering::Relaxed),
            http_requests: self.egress.requests.load(Ordering::Relaxed),
        }
    }

    pub fn wasi(&self) -> Result<WasiCtx> {
        std::fs::create_dir_all(&self.state_dir).with_context(|| format!("creating {}", self.state_dir.display()))?;
        let mut wasi = WasiCtx::builder();
        // Each instance owns a dedicated thread: blocking it on file I/O is
        // fine, and far cheaper than a hop through an async thread pool per call.
        wasi.allow_blocking_current_thread(true);
        wasi.preopened_dir(&self.state_dir, "/state", FsPerms::ReadWrite)
            .map_err(anyhow::Error::from)
            .with_context(|| format!("granting {}", self.state_dir.display()))?;
        for grant in &self.grants.dirs {
            let perms = if grant.read_only { FsPerms::ReadOnly } else { FsPerms::ReadWrite };
            wasi.preopened_dir(&grant.host, &grant.guest, perms)
                .map_err(anyhow::Error::from)
                .with_context(|| format!("granting {}", grant.host.display()))?;
        }
        wasi.envs(&self.env);
        // TCP is always on, so that every attempt reaches this check (and is
        // counted); only granted peers pass it.
        let net = self.net.clone();
        wasi.allow_tcp(true).allow_ip_name_lookup(!self.grants.net.is_empty()).socket_addr_check(move |addr, usage| {
            let net = net.clone();
            Box::pin(async move {
                match usage {
                    SocketAddrUse::TcpConnect => {
                        let granted = net.allows_connect(addr);
                        if !granted {
                            net.denied.fetch_add(1, Ordering::Relaxed);
                        }
                        granted
                    }
                    // The implicit bind before a connect: any port of the wildcard
                    // address, which lets nobody in (listening is refused below).
                    SocketAddrUse::TcpBind => addr.ip().is_unspecified() && addr.port() == 0,
                    _ => false,
                }
            })
        });
        if let Some(prefix) = &self.grants.stderr_prefix {
            wasi.stderr(PrefixedStderr { prefix: prefix.clone() });
        }
        Ok(wasi.build())
    }

    pub fn limits(&self) -> StoreLimits {
        wasmtime::StoreLimitsBuilder::new().memory_size(self.grants.memory).trap_on_grow_failure(true).build()
    }

    pub fn http_gate(&self) -> HttpGate {
        HttpGate { net: self.net.clone(), egress: self.egress.clone() }
    }
}

impl NetPolicy {
    /// Whether the plugin may look `name` up: only a granted name, or an
    /// address written out, which no resolver ever sees.
    fn allows_lookup(&self, name: &str) -> bool {
        let name = normal_host(name);
        name.parse::<IpAddr>().is_ok() || self.authorities.iter().any(|g| g.host == name)
    }

    /// Whether a TCP connect to `addr` reaches a granted peer: the grant's
    /// port, and an address its name resolves to. Each name is resolved at
    /// most once per process, when a connect first needs it, on the calling
    /// plugin thread (whose call deadline bounds a resolver that hangs). A
    /// name that does not resolve (the remote is down, DNS is out) allows
    /// nothing this time and is tried again next time.
    fn allows_connect(&self, addr: SocketAddr) -> bool {
        for grant in self.authorities.iter().filter(|g| g.port == addr.port()) {
            if grant.host.parse::<IpAddr>().is_ok_and(|ip| ip.to_canonical() == addr.ip().to_canonical()) {
                return true;
            }
            let key = (grant.host.clone(), grant.port);
            let known = self.resolved.lock().unwrap().get(&key).cloned();
            let addrs = match known {
                Some(addrs) => addrs,
                None => match (grant.host.as_str(), grant.port).to_socket_addrs() {
                    Ok(found) => {
                        let found: Vec<SocketAddr> = found.collect();
                        self.resolved.lock().unwrap().insert(key, found.clone());
                        found
                    }
                    Err(_) => continue,
                },
            };
            if addrs.iter().any(|a| a.ip().to_canonical() == addr.ip().to_canonical()) {
                return true;
            }
        }
        false
    }
}

/// Replaces wasmtime-wasi's `wasi:sockets/ip-name-lookup.resolve-addresses`,
/// which resolves any name once lookups are allowed, with one that resolves
/// only the names [`NetPolicy::allows_lookup`] admits and refuses the rest
/// before any query is sent.
pub fn gate_name_lookups(linker: &mut Linker<super::HostState>) -> Result<()> {
    linker.allow_shadowing(true);
    let mut lookup = linker
        .instance("wasi:sockets/ip-name-lookup@0.2.12")
        .map_err(|e| anyhow::anyhow!("gating name lookups: {e}"))?;
    lookup
        .func_wrap(
            "resolve-addresses",
            |mut store: wasmtime::StoreContextMut<'_, super::HostState>,
             (network, name): (Resource<Network>, String)| {
                let net = store.data().gate.net.clone();
                if !net.allows_lookup(&name) {
                    net.denied.fetch_add(1, Ordering::Relaxed);
                    return Ok((Err(ErrorCode::AccessDenied),));
                }
                match store.data_mut().sockets().resolve_addresses(network, name) {
                    Ok(stream) => Ok((Ok(stream),)),
                    Err(e) => Ok((Err(e.downcast()?),)),
                }
            },
        )
        .map_err(|e| anyhow::anyhow!("gating name lookups: {e}"))?;
    linker.allow_shadowing(false);
    Ok(())
}

/// Decides each wasi:http request by its authority (host and port, the
/// scheme's default port when none is given).
pub struct HttpGate {
    net: Arc<NetPolicy>,
    egress: Arc<Egress>,
}

type SendFuture = Box<
    dyn Future<
            Output = wasmtime_wasi_http::Result<(
                http::Response<WasiBody>,
                Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
            )>,
        > + Send,
>;

impl WasiHttpHooks for HttpGate {
    fn p2_error_from_tls(&mut self, err: &std::io::Error) -> wasmtime_wasi_http::p2::bindings::http::types::ErrorCode {
        use wasmtime_wasi_http::p2::bindings::http::types::ErrorCode;
        if super::egress::is_certificate_error(err) {
            ErrorCode::TlsCertificateError
        } else {
            ErrorCode::TlsProtocolError
        }
    }

    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
    ) -> SendFuture {
        drop(fut);
        let uri = request.uri();
        let default_port = if uri.scheme() == Some(&http::uri::Scheme::HTTPS) { 443 } else { 80 };
        let allowed = uri.authority().is_some_and(|a| {
            let host = a.host().trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
            let port = a.port_u16().unwrap_or(default_port);
            self.net.authorities.iter().any(|g| g.host == host && g.port == port)
        });
        if !allowed {
            self.net.denied.fetch_add(1, Ordering::Relaxed);
            return Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) });
        }
        // The plugin may ask for patience, but never more than a call is given.
        let limit = self.net.timeout;
        let clamp = |t: Option<Duration>| Some(t.map_or(limit, |t| t.min(limit)));
        let options = options.unwrap_or_default();
        let options = RequestOptions {
            connect_timeout: clamp(options.connect_timeout),
            first_byte_timeout: clamp(options.first_byte_timeout),
            between_bytes_timeout: clamp(options.between_bytes_timeout),
        };
        let egress = self.egress.clone();
        Box::new(async move {
            let response = egress.send(request, options).await?;
            // The pool drives each connection itself: nothing left for the caller to run.
            Ok((response, Box::new(async { Ok(()) }) as Box<dyn Future<Output = _> + Send>))
        })
    }
}

/// The plugin's stderr, shown on the host's stderr one prefixed line at a time.
struct PrefixedStderr {
    prefix: String,
}

impl IsTerminal for PrefixedStderr {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for PrefixedStderr {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(LinePrefixer::new(&self.prefix))
    }

    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(LinePrefixer::new(&self.prefix))
    }
}

/// Buffers a partial line so that each line appears whole, with the prefix,
/// and with nothing in it a terminal would interpret (see `text`).
struct LinePrefixer {
    prefix: String,
    partial: Vec<u8>,
}

/// A plugin that never ends its line still may not grow this buffer forever.
const MAX_LINE: usize = 16 * 1024;

impl LinePrefixer {
    fn new(prefix: &str) -> Self {
        LinePrefixer { prefix: prefix.to_string(), partial: Vec::new() }
    }

    fn push(&mut self, bytes: &[u8]) {
        self.partial.extend_from_slice(bytes);
        let mut out = String::new();
        let mut emit = |line: &[u8]| {
            out.push_str(&self.prefix);
            out.push_str(&super::text::stderr_line(&String::from_utf8_lossy(line)));
            out.push('\n');
        };
        while let Some(i) = self.partial.iter().position(|&b| b == b'\n') {
            emit(&self.partial[..i]);
            self.partial.drain(..=i);
        }
        if self.partial.len() > MAX_LINE {
            emit(&self.partial);
            self.partial.clear();
        }
        // Losing a diagnostic line is better than failing the plugin's call.
        let _ = std::io::stderr().write_all(out.as_bytes());
    }
}

impl Drop for LinePrefixer {
    fn drop(&mut self) {
        if !self.partial.is_empty() {
            self.push(b"\n");
        }
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for LinePrefixer {
    async fn ready(&mut self) {}
}

impl OutputStream for LinePrefixer {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

impl tokio::io::AsyncWrite for LinePrefixer {
    fn poll_write(mut self: Pin<&mut Self>, _: &mut TaskContext<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_grants_parse() {
        assert_eq!(
            NetGrant::parse("Cache.Example:8080").unwrap(),
            NetGrant { host: "cache.example".into(), port: 8080 }
        );
        assert_eq!(NetGrant::parse("[::1]:6379").unwrap(), NetGrant { host: "::1".into(), port: 6379 });
        assert!(NetGrant::parse("nohost").is_err());
        assert!(NetGrant::parse(":80").is_err());
        assert!(NetGrant::parse("h:99999").is_err());
    }
}
