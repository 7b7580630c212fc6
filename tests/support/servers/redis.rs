//! A real Redis server for the redis plugin's tests: Debian's redis-server,
//! started in the foreground as the test's child on 127.0.0.1 on a free port,
//! with no persistence, a password for the default user and one ACL user, and
//! killed when dropped (its [`Process`]).
//!
//! The binaries come from `.ci/tools/redis.sh`. This file must never touch
//! anything outside its temporary directory or listen anywhere but 127.0.0.1.

use std::process::Command;
use std::time::{Duration, Instant};

use super::Process;
use crate::support::remote::{Backend, RemoteServer};
use crate::support::{Bounded, free_port, text, tool};

/// The default user's password (`requirepass`).
pub const PASSWORD: &str = "correct-horse";
/// An ACL user allowed only keys under [`ACL_PREFIX`].
pub const ACL_USER: &str = "ci";
pub const ACL_PASSWORD: &str = "battery-staple";
pub const ACL_PREFIX: &str = "team-ci/";
/// The variable the tests grant to the plugin for `password-env`.
pub const PASSWORD_VAR: &str = "GOCP_TEST_REDIS_PASSWORD";

pub struct Redis {
    pub process: Process,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Redis {
    /// Starts redis-server on a free port and waits until it answers.
    pub fn start() -> Redis {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let process = Redis::spawn(&dir, port);
        Redis { process, port, dir }
    }

    /// Kills the server and starts a new, empty one on the same port, as a
    /// restart without persistence does: every client's connection breaks.
    pub fn restart(&mut self) {
        self.process.stop();
        self.process = Redis::spawn(&self.dir, self.port);
    }

    fn spawn(dir: &tempfile::TempDir, port: u16) -> Process {
        let mut command = Command::new(tool("redis-server"));
        command
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--requirepass", PASSWORD, "--daemonize", "no", "--protected-mode", "yes"])
            .arg("--dir")
            .arg(dir.path())
            // One config line: the user, on, its password, the keys it may use, its commands.
            .args(["--user", ACL_USER, "on", &format!(">{ACL_PASSWORD}"), &format!("~{ACL_PREFIX}*"), "+@all"]);
        let process = Process::start("redis-server", command, port, &dir.path().join("redis.log"));
        // Accepting connections comes before loading is done: wait for an answer.
        let server = |args: &[&str]| cli(port, args);
        let deadline = Instant::now() + Duration::from_secs(20);
        while server(&["PING"]) != "PONG" {
            assert!(Instant::now() < deadline, "redis-server on {port} does not answer PING");
            std::thread::sleep(Duration::from_millis(20));
        }
        process
    }

    /// Runs one command with redis-cli as the default user; its output, trimmed.
    pub fn cli(&self, args: &[&str]) -> String {
        cli(self.port, args)
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
    fn port(&self) -> u16 {
        self.port
    }

    fn stored(&self) -> usize {
        cli(self.port, &["DBSIZE"]).parse().expect("DBSIZE answers a number")
    }

    fn backend(&self) -> Backend {
        self.backend_with_env_password(PASSWORD)
    }

    fn backend_with_bad_credentials(&self) -> Backend {
        self.backend_with_env_password("wrong-password")
    }

    fn stop(&mut self) {
        self.process.stop();
    }
}

/// Runs one command with redis-cli as the default user; its output, trimmed.
fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new(tool("redis-cli"))
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-a", PASSWORD, "--no-auth-warning"])
        .args(args)
        .stdin(std::process::Stdio::null())
        .output_within(std::time::Duration::from_secs(60));
    text(&out.stdout).trim().to_string()
}
