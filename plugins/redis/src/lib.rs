//! `redis`: a remote cache backend (being written: see issue 5).

use gocp_plugin_sdk::{Backend, Capabilities, Config, Digest, Entry, Error, Info, export_backend};

struct Remote;

impl Backend for Remote {
    fn describe() -> Info {
        Info {
            name: "redis".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            summary: "not written yet".into(),
            max_instances: 0,
            config_keys: vec![],
        }
    }

    fn open(_config: Config) -> Result<(Self, Capabilities), Error> {
        Err(Error::InvalidConfig("the redis plugin is not written yet".into()))
    }

    fn read_entry(&mut self, _action_id: &Digest) -> Result<Entry, Error> {
        Err(Error::NotFound)
    }

    fn write_entry(&mut self, _action_id: &Digest, _entry: Entry) -> Result<(), Error> {
        Ok(())
    }
}

export_backend!(Remote);
