//! WsgiDAV as a plain WebDAV server: a PUT needs its parent collection to
//! exist (as with Apache mod_dav), so the plugin runs with `mkcol=true`. Basic
//! auth, data and logs in the server's own temporary directory; it runs as
//! the test's child and is killed when dropped.
//!
//! The program comes from `.ci/tools/wsgidav.sh`. This file must never touch
//! anything outside its temporary directory or listen anywhere but 127.0.0.1.

use std::fs;
use std::path::PathBuf;
use std::process::Command;

use super::{Process, http_backend};
use crate::support::remote::{Backend, RemoteServer};
use crate::support::{free_port, tool};

const USER: &str = "gocp";
const PASSWORD: &str = "correct-horse";
/// The variable the tests grant to the plugin for `basic-env`.
pub const CREDENTIALS_VAR: &str = "GOCP_TEST_WEBDAV_BASIC";

pub struct WsgiDav {
    process: Process,
    dir: tempfile::TempDir,
    pub port: u16,
}

impl WsgiDav {
    /// Starts WsgiDAV on a free port and waits until it accepts connections.
    pub fn start() -> WsgiDav {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let root = dir.path();
        fs::create_dir_all(root.join("data")).unwrap();
        let r = root.display();
        let conf = format!(
            "host: 127.0.0.1
port: {port}
server: cheroot
verbose: 3
provider_mapping:
  \"/\": \"{r}/data\"
http_authenticator:
  accept_basic: true
  accept_digest: false
  default_to_digest: false
  domain_controller: null
simple_dc:
  user_mapping:
    \"*\":
      \"{USER}\":
        password: \"{PASSWORD}\"
dir_browser:
  enable: false
lock_storage: false
property_manager: null
"
        );
        fs::write(root.join("wsgidav.yaml"), conf).unwrap();
        let mut command = Command::new(tool("wsgidav"));
        command.arg("--config").arg(root.join("wsgidav.yaml"));
        let process = Process::start("wsgidav", command, port, &root.join("server.log"));
        WsgiDav { process, dir, port }
    }

    /// What the server logged so far (every request, with its status).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// The directory WsgiDAV serves: what the cache holds, as files.
    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The plugin's flags for a namespace (`/gocp` in the scenarios) and a password.
    pub fn backend_at(&self, namespace: &str, password: &str) -> Backend {
        http_backend(self.port, namespace, CREDENTIALS_VAR, &format!("{USER}:{password}"), &["mkcol=true"])
    }
}

impl RemoteServer for WsgiDav {
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
