//! Real cache servers for the remote plugins' tests, each started on
//! 127.0.0.1 on a free port in a temporary directory, and killed when dropped.
//! The binaries come from `.ci/tools/*.sh` (found with `support::tool`).
pub mod azurite;
pub mod bazel_remote;
pub mod fake_gcs;
pub mod nginx;
pub mod redis;
pub mod s3;
pub mod wsgidav;

use std::fs;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::remote::Backend;

/// A server's process: started, waited for until it accepts connections on
/// its port, killed on [`Process::stop`] or when dropped.
pub struct Process {
    name: &'static str,
    child: Option<Child>,
    pub port: u16,
    /// Where its output goes, shown when it fails to start.
    log: PathBuf,
}

impl Process {
    /// Starts `command` (stdout and stderr to `log`) and waits up to 30 s
    /// for 127.0.0.1:`port` to accept a connection.
    pub fn start(name: &'static str, mut command: Command, port: u16, log: &Path) -> Process {
        let out = fs::File::create(log).unwrap();
        let child = command
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        let mut process = Process { name, child: Some(child), port, log: log.to_path_buf() };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            let exited = process.child.as_mut().unwrap().try_wait().unwrap();
            if exited.is_some() || Instant::now() > deadline {
                let log = fs::read_to_string(&process.log).unwrap_or_default();
                panic!("{name} did not start on 127.0.0.1:{port} ({exited:?}):\n{log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        process
    }

    /// Sends a signal (`-STOP`, `-CONT`, ...) to the running server.
    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().unwrap_or_else(|| panic!("{} is not running", self.name)).id().to_string();
        let status = Command::new("kill").args([sig, &pid]).status().expect("running kill");
        assert!(status.success(), "kill {sig} {pid} failed");
    }

    /// Kills the server at once, as an outage would.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The http plugin's flags for a server on `port`: `url` under `namespace`,
/// basic auth `user:password` through the granted variable `var`, and any
/// `extra` config pairs.
pub fn http_backend(port: u16, namespace: &str, var: &str, user_password: &str, extra: &[&str]) -> Backend {
    let mut args: Vec<String> = vec!["--plugin".into(), "http".into()];
    let config = [format!("url=http://127.0.0.1:{port}{namespace}"), format!("basic-env={var}")];
    for pair in config.iter().map(String::as_str).chain(extra.iter().copied()) {
        args.extend(["--config".into(), pair.to_string()]);
    }
    args.extend(["--allow-env".into(), var.into(), "--allow-net".into(), format!("127.0.0.1:{port}")]);
    Backend { args, env: vec![(var.into(), user_password.into())] }
}
