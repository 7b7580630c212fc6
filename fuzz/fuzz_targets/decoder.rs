//! Any bytes on stdin: the decoder returns requests or errors, never panics,
//! never loops, and never accepts a body whose size differs from BodySize.
#![no_main]

use std::io::{self, BufReader, Write};

use libfuzzer_sys::fuzz_target;

#[path = "../../host/src/protocol.rs"]
#[allow(dead_code)]
mod protocol;

// The protocol names its digests with the host's domain types.
#[path = "../../host/src/domain.rs"]
#[allow(dead_code)]
mod domain;

use protocol::{Body, Command, Decoder};

struct Counter(u64);

impl Write for Counter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    // A tiny buffer makes every body and line cross buffer boundaries.
    let capacity = 1 + data.first().copied().unwrap_or(0) as usize % 64;
    let mut decoder = Decoder::new(BufReader::with_capacity(capacity, data));
    // Each request consumes at least one byte, so this bound is never the
    // reason a well-behaved decoder stops.
    for _ in 0..=data.len() {
        match decoder.next_request() {
            Ok(Some(request)) => {
                if let Command::Put { body_size, .. } = request.command {
                    let mut body = Counter(0);
                    match decoder.read_body(request.id, body_size, &mut body) {
                        Ok(Body::Complete) => assert_eq!(body.0, body_size, "accepted a body of the wrong size"),
                        Ok(_) => {}
                        Err(_) => return,
                    }
                }
            }
            Ok(None) | Err(_) => return,
        }
    }
    panic!("the decoder returned more requests than there were bytes");
});
