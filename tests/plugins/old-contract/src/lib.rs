//! A plugin built against the previous contract, gocp:cache@0.1.0 (entries
//! without host data), as plugins written before 0.2.0 are: an in-memory
//! store of entries. gocp-host must keep serving it, and refuse to sign or
//! check entries through it.

use std::cell::RefCell;
use std::collections::HashMap;

wit_bindgen::generate!({
    path: "../../../host/wit/v0.1",
    world: "gocp:cache/plugin",
    generate_all,
});

use exports::gocp::cache::backend::{Capabilities, Entry, Error, Guest, Info};
use wasi::io::streams::{InputStream, OutputStream};

thread_local! {
    static ENTRIES: RefCell<HashMap<Vec<u8>, Entry>> = RefCell::new(HashMap::new());
}

struct OldContract;

impl Guest for OldContract {
    fn describe() -> Info {
        Info {
            name: "old-contract".into(),
            version: "0.0.0".into(),
            summary: "entries in memory, built for gocp:cache@0.1.0".into(),
            max_instances: 1,
            config_keys: Vec::new(),
        }
    }

    fn open(config: Vec<(String, String)>) -> Result<Capabilities, Error> {
        match config.first() {
            Some((key, _)) => Err(Error::InvalidConfig(format!("unknown configuration key(s): {key}"))),
            None => Ok(Capabilities { stores_bodies: false }),
        }
    }

    fn read_entry(action_id: Vec<u8>) -> Result<Entry, Error> {
        ENTRIES.with(|e| e.borrow().get(&action_id).cloned()).ok_or(Error::NotFound)
    }

    fn read_body(_output_id: Vec<u8>, _size: u64, _sink: &OutputStream) -> Result<(), Error> {
        Err(Error::NotFound)
    }

    fn write_body(_output_id: Vec<u8>, _size: u64, _body: &InputStream) -> Result<(), Error> {
        Ok(())
    }

    fn write_entry(action_id: Vec<u8>, entry: Entry) -> Result<(), Error> {
        ENTRIES.with(|e| e.borrow_mut().insert(action_id, entry));
        Ok(())
    }

    fn finish() -> Result<(), Error> {
        Ok(())
    }
}

export!(OldContract);
