//! versitygw, an S3 gateway run in production, serving a temporary directory
//! on 127.0.0.1 for the s3 plugin's tests (installed by
//! `.ci/tools/versitygw.sh`). Its posix backend makes a bucket a directory and
//! an object a file, so a test creates buckets with mkdir and can see what was
//! stored. The process is killed when the value is dropped; it must never be
//! shared between tests.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::Process;
use crate::support::remote::{Backend, RemoteServer};
use crate::support::{free_port, tool};

pub const ACCESS_KEY: &str = "gocp-test-key";
pub const SECRET_KEY: &str = "gocp-test-secret-9f8e7d6c";
pub const BUCKET: &str = "gocp-cache";

pub struct Versitygw {
    process: Process,
    port: u16,
    root: PathBuf,
    _dir: tempfile::TempDir,
}

impl Versitygw {
    /// Starts the gateway with one bucket, [`BUCKET`], and waits until it accepts connections.
    pub fn start() -> Versitygw {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        fs::create_dir_all(root.join(BUCKET)).unwrap();
        let port = free_port();
        let mut command = Command::new(tool("versitygw"));
        command
            .args(["--access", ACCESS_KEY, "--secret", SECRET_KEY, "--port", &format!("127.0.0.1:{port}"), "--quiet"])
            // As S3 does: connections are reused across requests.
            .arg("--keep-alive")
            .arg("posix")
            .arg(&root);
        let process = Process::start("versitygw", command, port, &dir.path().join("versitygw.log"));
        Versitygw { process, port, root, _dir: dir }
    }

    /// The directory that holds the bucket's objects.
    pub fn bucket_dir(&self) -> PathBuf {
        self.root.join(BUCKET)
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// gocp-host's flags for this server, with `extra` config pairs
    /// (`key=value`) and the given secret.
    pub fn backend_with(&self, extra: &[&str], secret: &str) -> Backend {
        let mut args: Vec<String> = vec!["--plugin".into(), "s3".into()];
        let config = [format!("bucket={BUCKET}"), format!("endpoint={}", self.endpoint())];
        for pair in config.iter().map(String::as_str).chain(extra.iter().copied()) {
            args.extend(["--config".into(), pair.to_string()]);
        }
        args.extend(["--allow-net".into(), format!("127.0.0.1:{}", self.port)]);
        for var in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] {
            args.extend(["--allow-env".into(), var.into()]);
        }
        let env =
            vec![("AWS_ACCESS_KEY_ID".into(), ACCESS_KEY.into()), ("AWS_SECRET_ACCESS_KEY".into(), secret.into())];
        Backend { args, env }
    }
}

impl RemoteServer for Versitygw {
    fn port(&self) -> u16 {
        self.port
    }

    fn stored(&self) -> usize {
        objects_under(&self.bucket_dir()).len()
    }

    fn backend(&self) -> Backend {
        self.backend_with(&[], SECRET_KEY)
    }

    fn backend_with_bad_credentials(&self) -> Backend {
        self.backend_with(&[], "not-the-secret")
    }

    fn stop(&mut self) {
        self.process.stop();
    }
}

/// Every object file below `dir`, skipping the gateway's own temporary files.
pub fn objects_under(dir: &Path) -> Vec<PathBuf> {
    crate::support::files_under(dir)
        .into_iter()
        .filter(|p| !p.components().any(|c| c.as_os_str() == ".sgwtmp"))
        .collect()
}
