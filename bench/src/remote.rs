//! The remote part of the benchmark: a Redis server on 127.0.0.1 as the
//! shared cache (the same redis-server the tests use, from `.ci/tools`), and
//! the redis plugin in front of it.
//!
//! It starts and stops only its own server process, on a free loopback port.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub struct Redis {
    child: Option<Child>,
    pub port: u16,
}

impl Redis {
    pub fn start(work: &Path) -> Result<Redis> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let dir = work.join("redis");
        std::fs::create_dir_all(&dir)?;
        let child = Command::new(tool("redis-server")?)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .current_dir(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting redis-server")?;
        let redis = Redis { child: Some(child), port };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("redis-server did not listen on 127.0.0.1:{port} within 20 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(redis)
    }

    /// gocp-host flags that use this server.
    pub fn flags(&self) -> String {
        let port = self.port;
        format!("--plugin redis --config url=redis://127.0.0.1:{port} --allow-net 127.0.0.1:{port}")
    }

    /// Kills the server: from then on its port refuses connections.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An executable from `$GOCP_TEST_TOOLS/bin` (see .ci/tools), else from PATH.
fn tool(name: &str) -> Result<PathBuf> {
    let tools = match std::env::var_os("GOCP_TEST_TOOLS") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?).join(".cache/gocp-test-tools"),
    };
    let mut dirs = vec![tools.join("bin")];
    dirs.extend(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()));
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .with_context(|| format!("{name} not found: run `bash .ci/tools/redis.sh` first"))
}
