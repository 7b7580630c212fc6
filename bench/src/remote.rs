//! The loopback remote part of the benchmark: a Redis server on 127.0.0.1 as
//! the shared cache (the same redis-server the tests use, from `.ci/tools`),
//! and the redis plugin in front of it, with no emulated link (the link part
//! is `link.rs`).
//!
//! It starts and stops only its own server process, on a free loopback port.

use std::path::Path;

use anyhow::Result;

use crate::servers::{self, Server};

pub struct Redis {
    server: Server,
}

impl Redis {
    pub fn start(work: &Path) -> Result<Redis> {
        Ok(Redis { server: servers::redis(&work.join("redis"))? })
    }

    /// gocp-host flags that use this server.
    pub fn flags(&self) -> String {
        let port = self.server.port;
        format!("--plugin redis --config url=redis://127.0.0.1:{port} --allow-net 127.0.0.1:{port}")
    }

    /// Kills the server: from then on its port refuses connections.
    pub fn stop(&mut self) {
        self.server.stop();
    }
}
