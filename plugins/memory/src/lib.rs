//! `memory`: a bounded in-memory cache backend, and the smallest complete plugin.
//!
//! It keeps entries and bodies in this instance's memory, evicting the least
//! recently used bodies once they exceed `max-bytes`. Everything is gone when the
//! host exits, so it only ever helps within one go command. It must never touch
//! the filesystem or the network: it is the reference for what a plugin needs
//! at the very least.

use std::collections::{BTreeMap, HashMap};

use gocp_plugin_sdk::{
    Backend, Capabilities, Config, ConfigKey, Digest, Entry, Error, Info, InputStream, OutputStream, copy_from_stream,
    export_backend, write_all,
};

const DEFAULT_MAX_BYTES: u64 = 256 << 20;

struct Memory {
    max_bytes: u64,
    entries: HashMap<Digest, Entry>,
    bodies: HashMap<Digest, Body>,
    /// Bodies by last use: the oldest tick is evicted first.
    by_use: BTreeMap<u64, Digest>,
    tick: u64,
    body_bytes: u64,
}

struct Body {
    bytes: Vec<u8>,
    last_use: u64,
}

impl Memory {
    fn touch(&mut self, id: &Digest) {
        self.tick += 1;
        if let Some(body) = self.bodies.get_mut(id) {
            self.by_use.remove(&body.last_use);
            body.last_use = self.tick;
            self.by_use.insert(self.tick, *id);
        }
    }

    fn evict_to(&mut self, limit: u64) {
        while self.body_bytes > limit {
            let Some((_, id)) = self.by_use.pop_first() else { break };
            if let Some(body) = self.bodies.remove(&id) {
                self.body_bytes -= body.bytes.len() as u64;
            }
        }
    }
}

impl Backend for Memory {
    fn describe() -> Info {
        Info {
            name: "memory".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            summary: "bounded in-memory store (least recently used bodies evicted); lasts one go command".into(),
            max_instances: 1,
            config_keys: vec![ConfigKey {
                name: "max-bytes".into(),
                help: "bodies kept in memory before the least recently used are dropped (default 256MiB)".into(),
            }],
        }
    }

    fn open(mut config: Config) -> Result<(Self, Capabilities), Error> {
        let max_bytes = config.take_size("max-bytes", DEFAULT_MAX_BYTES)?;
        config.finish()?;
        let memory = Memory {
            max_bytes,
            entries: HashMap::new(),
            bodies: HashMap::new(),
            by_use: BTreeMap::new(),
            tick: 0,
            body_bytes: 0,
        };
        Ok((memory, Capabilities { stores_bodies: true }))
    }

    fn read_entry(&mut self, action_id: &Digest) -> Result<Entry, Error> {
        let entry = self.entries.get(action_id).ok_or(Error::NotFound)?.clone();
        self.touch(&entry.output_id);
        Ok(entry)
    }

    fn write_entry(&mut self, action_id: &Digest, entry: Entry) -> Result<(), Error> {
        self.entries.insert(*action_id, entry);
        Ok(())
    }

    fn read_body(&mut self, output_id: &Digest, size: u64, sink: &OutputStream) -> Result<(), Error> {
        self.touch(output_id);
        let body = self.bodies.get(output_id).ok_or(Error::NotFound)?;
        if body.bytes.len() as u64 != size {
            return Err(Error::NotFound);
        }
        write_all(sink, &body.bytes)
    }

    fn write_body(&mut self, output_id: &Digest, size: u64, body: &InputStream) -> Result<(), Error> {
        if self.bodies.contains_key(output_id) {
            self.touch(output_id);
            return Ok(());
        }
        if size > self.max_bytes {
            // Keeping it would evict everything else; the host still has it on disk.
            return Ok(());
        }
        let mut bytes = Vec::with_capacity(size as usize);
        copy_from_stream(body, &mut bytes)?;
        self.evict_to(self.max_bytes - bytes.len() as u64);
        self.tick += 1;
        self.body_bytes += bytes.len() as u64;
        self.by_use.insert(self.tick, *output_id);
        self.bodies.insert(*output_id, Body { bytes, last_use: self.tick });
        Ok(())
    }
}

export_backend!(Memory);
