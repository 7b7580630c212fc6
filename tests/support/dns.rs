//! A name server that never answers, and a way to run a command with it as
//! the only resolver: for tests of what gocp-host resolves, and when.
//!
//! The server listens on port 53 of an address of its own in 127.0.0.0/8
//! (resolv.conf names servers without ports) and records every name it is
//! asked. The command runs in a private mount namespace (`unshare -m`) whose
//! /etc/resolv.conf points at that server, so nothing the test does reaches
//! the machine's real resolver, and nothing outside the test is affected.

use std::net::{Ipv4Addr, UdpSocket};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

pub struct SilentResolver {
    names: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    conf: PathBuf,
    _dir: tempfile::TempDir,
}

impl SilentResolver {
    pub fn start() -> SilentResolver {
        let socket = (1..=250u8)
            .find_map(|n| UdpSocket::bind((Ipv4Addr::new(127, 53, 53, n), 53)).ok())
            .expect("binding a UDP port 53 on 127.53.53.x (the tests run as root)");
        socket.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let addr = socket.local_addr().unwrap().ip();
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("resolv.conf");
        std::fs::write(&conf, format!("nameserver {addr}\noptions timeout:2 attempts:1\n")).unwrap();
        let names = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (names, stop) = (names.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut packet = [0u8; 512];
                while !stop.load(Ordering::SeqCst) {
                    if let Ok((n, _)) = socket.recv_from(&mut packet) {
                        names.lock().unwrap().push(question(&packet[..n]));
                    }
                }
            })
        };
        SilentResolver { names, stop, thread: Some(thread), conf, _dir: dir }
    }

    /// `program args...`, run with this server as its only resolver.
    pub fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("unshare");
        cmd.args(["-m", "sh", "-c", r#"mount --bind "$0" /etc/resolv.conf && exec "$@""#])
            .arg(&self.conf)
            .arg(program)
            .args(args);
        cmd
    }

    /// Every name asked so far.
    pub fn names(&self) -> Vec<String> {
        self.names.lock().unwrap().clone()
    }
}

impl Drop for SilentResolver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The name a DNS query asks about (its first question), dotted.
fn question(packet: &[u8]) -> String {
    let mut labels = Vec::new();
    let mut at = 12;
    while let Some(&len) = packet.get(at) {
        if len == 0 || len & 0xc0 != 0 {
            break;
        }
        let label = packet.get(at + 1..at + 1 + len as usize).unwrap_or_default();
        labels.push(String::from_utf8_lossy(label).into_owned());
        at += 1 + len as usize;
    }
    labels.join(".")
}
