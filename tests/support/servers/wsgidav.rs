//! WsgiDAV as a plain WebDAV server: a PUT needs its parent collection to
//! exist (as with Apache mod_dav), so the plugin runs with `mkcol=true`. Basic
//! auth, data and logs in the server's own temporary directory; it runs as
//! the test's child and is killed when dropped.
//!
//! The program comes from `.ci/tools/wsgidav.sh`. This file must never touch
//! anything outside its temporary directory or listen anywhere but 127.0.0.1.

use std::fs;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::remote::{Backend, RemoteServer};
use crate::support::{free_port, tool};

const USER: &str = "gocp";
const PASSWORD: &str = "correct-horse";
/// The variable the tests grant to the plugin for `basic-env`.
pub const CREDENTIALS_VAR: &str = "GOCP_TEST_WEBDAV_BASIC";

pub struct WsgiDav {
    child: Option<Child>,
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
        let log = fs::File::create(root.join("server.log")).unwrap();
        let child = Command::new(tool("wsgidav"))
            .arg("--config")
            .arg(root.join("wsgidav.yaml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting wsgidav");
        let mut server = WsgiDav { child: Some(child), dir, port };
        server.wait_listening();
        server
    }

    fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            let exited = self.child.as_mut().unwrap().try_wait().unwrap();
            if exited.is_some() || Instant::now() > deadline {
                let log = fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
                panic!("wsgidav did not start on 127.0.0.1:{} ({exited:?}):\n{log}", self.port);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The directory WsgiDAV serves: what the cache holds, as files.
    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The plugin's flags for a namespace (`/gocp` in the scenarios) and a password.
    pub fn backend_at(&self, namespace: &str, password: &str) -> Backend {
        let port = self.port;
        Backend {
            args: vec![
                "--plugin".into(),
                "http".into(),
                "--config".into(),
                format!("url=http://127.0.0.1:{port}{namespace}"),
                "--config".into(),
                "mkcol=true".into(),
                "--config".into(),
                format!("basic-env={CREDENTIALS_VAR}"),
                "--allow-env".into(),
                CREDENTIALS_VAR.into(),
                "--allow-net".into(),
                format!("127.0.0.1:{port}"),
            ],
            env: vec![(CREDENTIALS_VAR.into(), format!("{USER}:{password}"))],
        }
    }
}

impl RemoteServer for WsgiDav {
    fn backend(&self) -> Backend {
        self.backend_at("/gocp", PASSWORD)
    }

    fn backend_with_bad_credentials(&self) -> Backend {
        self.backend_at("/gocp", "wrong-password")
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for WsgiDav {
    fn drop(&mut self) {
        self.stop();
    }
}
