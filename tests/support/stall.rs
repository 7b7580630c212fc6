//! A TCP proxy in front of a real server that passes small answers and stalls
//! large ones: entries arrive, bodies stop after their first bytes and the
//! connection stays open, silent. What a server, a load balancer or a flaky
//! link does to a cache when it goes wrong halfway.
//!
//! An answer is what the server sends between two requests of the client;
//! once one exceeds the limit, the connection forwards nothing more.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

pub struct StallingProxy {
    pub port: u16,
    stop: Arc<AtomicBool>,
    streams: Arc<Mutex<Vec<TcpStream>>>,
    thread: Option<JoinHandle<()>>,
}

/// How often a blocked proxy thread looks whether it should stop.
const POLL: Duration = Duration::from_millis(50);

impl StallingProxy {
    /// Listens on a free port of 127.0.0.1, forwarding to `upstream` there;
    /// answers of more than `answer_limit` bytes stall after that many.
    pub fn start(upstream: u16, answer_limit: usize) -> StallingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let streams = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, streams) = (stop.clone(), streams.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let Ok((client, _)) = listener.accept() else {
                        std::thread::sleep(POLL);
                        continue;
                    };
                    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else { continue };
                    client.set_nonblocking(false).unwrap();
                    for s in [&client, &server] {
                        s.set_read_timeout(Some(POLL)).unwrap();
                        streams.lock().unwrap().push(s.try_clone().unwrap());
                    }
                    relay(client, server, answer_limit, stop.clone());
                }
            })
        };
        StallingProxy { port, stop, streams, thread: Some(thread) }
    }
}

/// Two threads per connection: requests pass freely and start a new answer;
/// answers pass until one is too long.
fn relay(client: TcpStream, server: TcpStream, limit: usize, stop: Arc<AtomicBool>) {
    let answered = Arc::new(AtomicUsize::new(0));
    let (mut from_client, mut to_server) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    let (requests_stop, requests_answered) = (stop.clone(), answered.clone());
    std::thread::spawn(move || {
        let mut buf = [0u8; 64 * 1024];
        while !requests_stop.load(Ordering::SeqCst) {
            match from_client.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    requests_answered.store(0, Ordering::SeqCst);
                    if to_server.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
                Err(e) if is_timeout(&e) => {}
                Err(_) => return,
            }
        }
    });
    let (mut from_server, mut to_client) = (server, client);
    std::thread::spawn(move || {
        let mut buf = [0u8; 64 * 1024];
        while !stop.load(Ordering::SeqCst) {
            match from_server.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    let before = answered.fetch_add(n, Ordering::SeqCst);
                    let pass = n.min(limit.saturating_sub(before));
                    if to_client.write_all(&buf[..pass]).is_err() {
                        return;
                    }
                    if pass < n {
                        // Stalled: hold the connection open, silent, until the end.
                        while !stop.load(Ordering::SeqCst) {
                            std::thread::sleep(POLL);
                        }
                        return;
                    }
                }
                Err(e) if is_timeout(&e) => {}
                Err(_) => return,
            }
        }
    });
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
}

impl Drop for StallingProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for s in self.streams.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
