//! A real Redis server for the redis plugin's tests: Debian's redis-server,
//! started in the foreground as the test's child on 127.0.0.1 on a free port,
//! with no persistence, a password for the default user and one ACL user, and
//! killed when dropped.
//!
//! The binaries come from `.ci/tools/redis.sh`. This file must never touch
//! anything outside its temporary directory or listen anywhere but 127.0.0.1.

use std::fs;
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::remote::{Backend, RemoteServer};
use crate::support::{free_port, text, tool};

/// The default user's password (`requirepass`).
pub const PASSWORD: &str = "correct-horse";
/// An ACL user allowed only keys under [`ACL_PREFIX`].
pub const ACL_USER: &str = "ci";
pub const ACL_PASSWORD: &str = "battery-staple";
pub const ACL_PREFIX: &str = "team-ci/";
/// The variable the tests grant to the plugin for `password-env`.
pub const PASSWORD_VAR: &str = "GOCP_TEST_REDIS_PASSWORD";

pub struct Redis {
    child: Option<Child>,
    dir: tempfile::TempDir,
    pub port: u16,
}

impl Redis {
    /// Starts redis-server on a free port and waits until it answers.
    pub fn start() -> Redis {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = Redis::spawn(&dir, port);
        let mut server = Redis { child: Some(child), dir, port };
        server.wait_ready();
        server
    }

    /// Kills the server and starts a new, empty one on the same port, as a
    /// restart without persistence does: every client's connection breaks.
    pub fn restart(&mut self) {
        self.stop();
        self.child = Some(Redis::spawn(&self.dir, self.port));
        self.wait_ready();
    }

    fn spawn(dir: &tempfile::TempDir, port: u16) -> Child {
        Command::new(tool("redis-server"))
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--requirepass", PASSWORD, "--daemonize", "no", "--protected-mode", "yes"])
            .arg("--dir")
            .arg(dir.path())
            .arg("--logfile")
            .arg(dir.path().join("redis.log"))
            // One config line: the user, on, its password, the keys it may use, its commands.
            .args(["--user", ACL_USER, "on", &format!(">{ACL_PASSWORD}"), &format!("~{ACL_PREFIX}*"), "+@all"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting redis-server")
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() && self.cli(&["PING"]) == "PONG" {
                return;
            }
            let exited = self.child.as_mut().unwrap().try_wait().unwrap();
            if exited.is_some() || Instant::now() > deadline {
                let log = fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default();
                panic!("redis-server did not start on 127.0.0.1:{} ({exited:?}):\n{log}", self.port);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs one command with redis-cli as the default user; its output, trimmed.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(tool("redis-cli"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-a", PASSWORD, "--no-auth-warning"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running redis-cli");
        text(&out.stdout).trim().to_string()
    }

    /// How many times the server ran `command` (from INFO commandstats).
    pub fn calls(&self, command: &str) -> u64 {
        let stats = self.cli(&["INFO", "commandstats"]);
        let prefix = format!("cmdstat_{}:calls=", command.to_lowercase());
        stats
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map_or(0, |rest| rest.split(',').next().unwrap().parse().unwrap())
    }

    /// The keys matching a pattern, sorted.
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        let mut keys: Vec<String> = self.cli(&["--scan", "--pattern", pattern]).lines().map(str::to_string).collect();
        keys.sort();
        keys
    }

    /// The plugin's flags: `--plugin redis`, the url, the grant, and `extra` config pairs.
    pub fn backend_with(&self, url_credentials: &str, extra: &[&str]) -> Backend {
        let port = self.port;
        let mut args = vec![
            "--plugin".into(),
            "redis".into(),
            "--config".into(),
            format!("url=redis://{url_credentials}127.0.0.1:{port}"),
            "--allow-net".into(),
            format!("127.0.0.1:{port}"),
        ];
        for pair in extra {
            args.push("--config".into());
            args.push(pair.to_string());
        }
        Backend { args, env: vec![] }
    }

    /// The password through a granted variable, as a CI secret would come.
    pub fn backend_with_env_password(&self, password: &str) -> Backend {
        let mut backend = self.backend_with("", &[&format!("password-env={PASSWORD_VAR}")]);
        backend.args.extend(["--allow-env".into(), PASSWORD_VAR.into()]);
        backend.env.push((PASSWORD_VAR.into(), password.into()));
        backend
    }
}

impl RemoteServer for Redis {
    fn backend(&self) -> Backend {
        self.backend_with_env_password(PASSWORD)
    }

    fn backend_with_bad_credentials(&self) -> Backend {
        self.backend_with_env_password("wrong-password")
    }

    fn stop(&mut self) {
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
