//! bazel-remote, the Bazel remote cache server teams already run, serving a
//! temporary directory on 127.0.0.1 for the http plugin's tests (built from
//! source by `.ci/tools/bazel-remote.sh`): HTTP only (gRPC off), basic auth
//! from an htpasswd file, and by default with `--disable_http_ac_validation`,
//! which gocp's entries need (they are not Bazel ActionResults). The process
//! is killed when the value is dropped; it must never be shared between tests.

use std::fs;
use std::path::PathBuf;
use std::process::Command;

use super::{Process, http_backend};
use crate::support::remote::{Backend, RemoteServer};
use crate::support::{free_port, tool};

const USER: &str = "gocp";
const PASSWORD: &str = "correct-horse";
/// `openssl passwd -apr1 -salt gocptest correct-horse`: bazel-remote reads
/// Apache's MD5 scheme, and a fixed hash spares the tests a hashing tool.
const PASSWORD_HASH: &str = "$apr1$gocptest$2m6h0EtrJ.BBv9e82b8dp0";
/// The variable the tests grant to the plugin for `basic-env`.
pub const CREDENTIALS_VAR: &str = "GOCP_TEST_BAZEL_REMOTE_BASIC";

/// How a test wants the server.
#[derive(Clone, Copy, Default)]
pub struct Options {
    /// bazel-remote's default: PUTs under /ac/ must be ActionResults.
    pub validate_ac: bool,
    /// `--allow_unauthenticated_reads`: only writes need the password.
    pub public_reads: bool,
}

pub struct BazelRemote {
    process: Process,
    dir: tempfile::TempDir,
    pub port: u16,
}

impl BazelRemote {
    /// Starts bazel-remote as the http plugin needs it, with a password.
    pub fn start() -> BazelRemote {
        BazelRemote::start_with(Options::default())
    }

    pub fn start_with(options: Options) -> BazelRemote {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let htpasswd = dir.path().join("htpasswd");
        fs::write(&htpasswd, format!("{USER}:{PASSWORD_HASH}\n")).unwrap();
        let mut command = Command::new(tool("bazel-remote"));
        command
            .arg("--dir")
            .arg(dir.path().join("data"))
            // GiB: room for the large-body test's bodies several times over.
            .args(["--max_size", "2", "--http_address", &format!("127.0.0.1:{port}"), "--grpc_address", "none"])
            .arg("--htpasswd_file")
            .arg(&htpasswd);
        if !options.validate_ac {
            command.arg("--disable_http_ac_validation");
        }
        if options.public_reads {
            command.arg("--allow_unauthenticated_reads");
        }
        let process = Process::start("bazel-remote", command, port, &dir.path().join("server.log"));
        BazelRemote { process, dir, port }
    }

    /// Where bazel-remote keeps what it stores: `cas.v2/` for bodies,
    /// `raw.v2/` for entries stored without validation, `ac.v2/` for ActionResults.
    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// What bazel-remote logged: one line per request served.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// The plugin's flags for reading without any credentials.
    pub fn backend_without_credentials(&self) -> Backend {
        let url = format!("url=http://127.0.0.1:{}/gocp", self.port);
        let grant = format!("127.0.0.1:{}", self.port);
        Backend {
            args: ["--plugin", "http", "--config", &url, "--allow-net", &grant].map(String::from).to_vec(),
            env: Vec::new(),
        }
    }

    fn backend_with_password(&self, password: &str) -> Backend {
        http_backend(self.port, "/gocp", CREDENTIALS_VAR, &format!("{USER}:{password}"), &[])
    }
}

impl RemoteServer for BazelRemote {
    fn port(&self) -> u16 {
        self.port
    }

    fn stored(&self) -> usize {
        crate::support::files_under(&self.data())
            .iter()
            .filter(|p| {
                p.components().any(|c| ["cas.v2", "raw.v2", "ac.v2"].contains(&c.as_os_str().to_str().unwrap_or("")))
            })
            .count()
    }

    fn backend(&self) -> Backend {
        self.backend_with_password(PASSWORD)
    }

    fn backend_with_bad_credentials(&self) -> Backend {
        self.backend_with_password("wrong-password")
    }

    fn stop(&mut self) {
        self.process.stop();
    }
}
