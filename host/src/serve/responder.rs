//! The protocol channel out: responses to the go command, on stdout.
//!
//! The thread that has a response writes it itself: handing it to a writer
//! thread would add a wake-up to every request's latency. When several
//! threads answer at once, the one writing takes the others' responses along
//! in its next write, so the rest return at once and no line is ever split.
//!
//! It owns the only handle on the protocol's output; nothing else in the
//! process may write there.

use std::io::Write;
use std::sync::Mutex;

use crate::protocol::Response;

pub struct Responder {
    pending: Mutex<Pending>,
    /// None once closed, or once the go command stopped reading.
    out: Mutex<Option<Box<dyn Write + Send>>>,
}

#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    /// A thread is writing; it will also write whatever is added meanwhile.
    writing: bool,
}

impl Responder {
    pub fn new(out: Box<dyn Write + Send>) -> Responder {
        Responder { pending: Mutex::new(Pending::default()), out: Mutex::new(Some(out)) }
    }

    pub fn send(&self, response: &Response) {
        let mut pending = self.pending.lock().unwrap();
        response.encode(&mut pending.bytes);
        if pending.writing {
            return;
        }
        pending.writing = true;
        loop {
            let batch = std::mem::take(&mut pending.bytes);
            if batch.is_empty() {
                pending.writing = false;
                return;
            }
            drop(pending);
            let mut out = self.out.lock().unwrap();
            if let Some(w) = out.as_mut()
                && w.write_all(&batch).and_then(|()| w.flush()).is_err()
            {
                // The go command is gone; nothing more can be delivered.
                *out = None;
            }
            drop(out);
            pending = self.pending.lock().unwrap();
        }
    }

    /// Closes the channel: the go command sees end of file. Later sends are dropped.
    pub fn close(&self) {
        self.out.lock().unwrap().take();
    }
}
