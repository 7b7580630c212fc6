//! nginx as a Bazel HTTP remote cache, the way many teams run one: WebDAV PUT
//! into a directory, behind basic auth. It runs in the foreground as the
//! test's child with everything (config, logs, pid, temp files, data) inside
//! its own temporary directory, and is killed when dropped.
//!
//! The binary comes from `.ci/tools/nginx.sh`. This file must never touch
//! anything outside its temporary directory or listen anywhere but 127.0.0.1.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{Process, http_backend};
use crate::support::remote::{Backend, RemoteServer};
use crate::support::{free_port, tool};

const USER: &str = "gocp";
const PASSWORD: &str = "correct-horse";
/// The variable the tests grant to the plugin for `basic-env`.
pub const CREDENTIALS_VAR: &str = "GOCP_TEST_HTTP_BASIC";

pub struct Nginx {
    process: Process,
    dir: tempfile::TempDir,
    pub port: u16,
}

impl Nginx {
    /// Starts nginx on a free port and waits until it accepts connections.
    pub fn start() -> Nginx {
        Nginx::start_with("", None)
    }

    /// The same, serving reads to anyone: only writes need the password,
    /// as a cache that forks' jobs read without secrets is set up.
    pub fn start_public_reads() -> Nginx {
        Nginx::start_with("limit_except GET HEAD", None)
    }

    /// The same over HTTPS only, with the certificate and key (PEM files)
    /// given.
    pub fn start_tls(certificate: &Path, key: &Path) -> Nginx {
        Nginx::start_with("", Some((certificate, key)))
    }

    /// `auth_scope`: the directive whose block the password applies in
    /// (empty: every request); `tls`: certificate and key, for HTTPS.
    fn start_with(auth_scope: &str, tls: Option<(&Path, &Path)>) -> Nginx {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let root = dir.path();
        fs::create_dir_all(root.join("data")).unwrap();
        fs::create_dir_all(root.join("tmp")).unwrap();
        // nginx reads `{PLAIN}` passwords as they are: a test needs no hashing tool.
        fs::write(root.join("htpasswd"), format!("{USER}:{{PLAIN}}{PASSWORD}\n")).unwrap();
        let r = root.display();
        let auth = format!("auth_basic \"gocp cache\"; auth_basic_user_file {r}/htpasswd;");
        let auth = if auth_scope.is_empty() { auth } else { format!("{auth_scope} {{ {auth} }}") };
        let (ssl, certificates) = match tls {
            Some((certificate, key)) => {
                (" ssl", format!("ssl_certificate {}; ssl_certificate_key {};", certificate.display(), key.display()))
            }
            None => ("", String::new()),
        };
        // One process (master_process off): killing it stops the server whole,
        // and as root it needs no `user` to drop to.
        let conf = format!(
            "daemon off;
master_process off;
worker_processes 1;
pid {r}/nginx.pid;
error_log {r}/error.log info;
events {{ worker_connections 512; }}
http {{
  log_format gocp '$remote_addr [$time_local] \"$request\" $status $body_bytes_sent conn=$connection';
  access_log {r}/access.log gocp;
  client_body_temp_path {r}/tmp/body;
  proxy_temp_path {r}/tmp/proxy;
  fastcgi_temp_path {r}/tmp/fastcgi;
  uwsgi_temp_path {r}/tmp/uwsgi;
  scgi_temp_path {r}/tmp/scgi;
  server {{
    listen 127.0.0.1:{port}{ssl};
    {certificates}
    root {r}/data;
    client_max_body_size 0;
    location / {{
      dav_methods PUT;
      create_full_put_path on;
      dav_access user:rw group:r all:r;
      {auth}
    }}
  }}
}}
"
        );
        fs::write(root.join("nginx.conf"), conf).unwrap();
        let mut command = Command::new(tool("nginx"));
        command.arg("-p").arg(root).arg("-c").arg(root.join("nginx.conf")).arg("-e").arg(root.join("error.log"));
        let process = Process::start("nginx", command, port, &root.join("server.log"));
        Nginx { process, dir, port }
    }

    /// Freezes the server (SIGSTOP): connections are still accepted by the
    /// kernel, but nothing answers, as with a hung server.
    pub fn freeze(&self) {
        self.process.signal("-STOP");
    }

    /// Undoes [`Nginx::freeze`].
    pub fn thaw(&self) {
        self.process.signal("-CONT");
    }

    /// The directory nginx serves: what the cache holds, as files.
    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Requests nginx served so far, one line each (method, path, status,
    /// bytes, and `conn=N`: the connection it came on).
    pub fn access_log(&self) -> String {
        fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
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

    /// The plugin's flags for a namespace (`/gocp` in the scenarios) and a password.
    pub fn backend_at(&self, namespace: &str, password: &str) -> Backend {
        http_backend(self.port, namespace, CREDENTIALS_VAR, &format!("{USER}:{password}"), &[])
    }
}

impl RemoteServer for Nginx {
    fn port(&self) -> u16 {
        self.port
    }

    fn stored(&self) -> usize {
        crate::support::files_under(&self.data()).len()
    }

    fn backend(&self) -> Backend {
        self.backend_at("/gocp", PASSWORD)
    }

    fn backend_with_bad_credentials(&self) -> Backend {
        self.backend_at("/gocp", "wrong-password")
    }

    fn stop(&mut self) {
        self.process.stop();
    }
}
