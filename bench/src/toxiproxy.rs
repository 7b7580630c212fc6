//! The emulated network link: the link profiles (LAN, WAN), and toxiproxy
//! (a TCP proxy that adds latency and bandwidth limits) driven through its
//! HTTP API: one proxy per server, in front of it on 127.0.0.1, with the
//! profile's toxics on both directions.
//!
//! It owns the link and nothing else: it never starts a cache server or a
//! helper, never measures, and removes every proxy it made when that proxy's
//! value is dropped (the toxiproxy process itself is a `servers::Server`).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

use crate::servers::{self, Server};

/// A link profile: what toxiproxy adds to every connection.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Link {
    pub name: &'static str,
    /// Added in each direction: a round trip costs twice this.
    pub latency_ms: u64,
    /// Each direction of each connection is limited to this many KB/s
    /// (toxiproxy's unit: 1 KB = 1000 bytes); `None` is no limit.
    pub rate_kb_per_s: Option<u64>,
}

pub const LAN: Link = Link { name: "LAN", latency_ms: 1, rate_kb_per_s: None };
/// As issue 17 measured: 20 ms round trip, 25 MB/s each way per connection.
pub const WAN: Link = Link { name: "WAN", latency_ms: 10, rate_kb_per_s: Some(25_000) };

impl Link {
    pub fn describe(&self) -> String {
        let rtt = 2 * self.latency_ms;
        let each = self.latency_ms;
        match self.rate_kb_per_s {
            None => format!("{} ({rtt} ms round trip: {each} ms each way; no bandwidth limit)", self.name),
            Some(kb) => format!(
                "{} ({rtt} ms round trip: {each} ms each way; {} MB/s each way on every connection)",
                self.name,
                kb as f64 / 1000.0
            ),
        }
    }
}

/// A toxiproxy server, killed when dropped.
pub struct Toxiproxy {
    server: Server,
}

/// One proxy: connections to 127.0.0.1:`port` reach the upstream through
/// the link. Removed from toxiproxy when dropped.
pub struct Proxy<'a> {
    toxiproxy: &'a Toxiproxy,
    name: String,
    pub port: u16,
}

impl Toxiproxy {
    pub fn start(dir: &Path) -> Result<Toxiproxy> {
        Ok(Toxiproxy { server: servers::toxiproxy(dir)? })
    }

    /// A proxy named `name` on 127.0.0.1:`listen` in front of
    /// 127.0.0.1:`upstream`, with `link`'s toxics on both directions. The
    /// caller chooses the port: a server may have to be told it first.
    pub fn proxy(&self, name: &str, listen: u16, upstream: u16, link: &Link) -> Result<Proxy<'_>> {
        let made = self.call(
            "POST",
            "/proxies",
            Some(json!({
                "name": name,
                "listen": format!("127.0.0.1:{listen}"),
                "upstream": format!("127.0.0.1:{upstream}"),
                "enabled": true,
            })),
        )?;
        let answered = made["listen"].as_str().context("toxiproxy's answer has no listen address")?;
        let port: u16 =
            answered.rsplit(':').next().and_then(|p| p.parse().ok()).context("toxiproxy's listen address")?;
        let proxy = Proxy { toxiproxy: self, name: name.to_string(), port };
        ensure!(port == listen, "toxiproxy listens on {answered}, not on port {listen} as asked");
        // upstream: client to server; downstream: server to client.
        for stream in ["upstream", "downstream"] {
            let path = format!("/proxies/{name}/toxics");
            let latency = json!({
                "name": format!("latency_{stream}"),
                "type": "latency",
                "stream": stream,
                "toxicity": 1.0,
                "attributes": { "latency": link.latency_ms, "jitter": 0 },
            });
            self.call("POST", &path, Some(latency))?;
            if let Some(rate) = link.rate_kb_per_s {
                let bandwidth = json!({
                    "name": format!("bandwidth_{stream}"),
                    "type": "bandwidth",
                    "stream": stream,
                    "toxicity": 1.0,
                    "attributes": { "rate": rate },
                });
                self.call("POST", &path, Some(bandwidth))?;
            }
        }
        Ok(proxy)
    }

    /// One request to the API (HTTP/1.0, so the answer is never chunked),
    /// bounded by socket timeouts; the answer's JSON body.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let port = self.server.port;
        let mut s = TcpStream::connect(("127.0.0.1", port)).context("connecting to toxiproxy's API")?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.set_write_timeout(Some(Duration::from_secs(10)))?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        write!(
            s,
            "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: gocp-bench\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        let mut answer = String::new();
        s.read_to_string(&mut answer).with_context(|| format!("reading toxiproxy's answer to {method} {path}"))?;
        let (head, rest) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
        let status: u16 = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        if !(200..300).contains(&status) {
            bail!("toxiproxy: {method} {path} answered {status}: {}", rest.trim());
        }
        if rest.trim().is_empty() {
            return Ok(Value::Null);
        }
        let value: Value = serde_json::from_str(rest).with_context(|| format!("toxiproxy's answer {rest:?}"))?;
        ensure!(!value.is_null(), "toxiproxy answered {method} {path} with null");
        Ok(value)
    }
}

impl Drop for Proxy<'_> {
    fn drop(&mut self) {
        let _ = self.toxiproxy.call("DELETE", &format!("/proxies/{}", self.name), None);
    }
}
