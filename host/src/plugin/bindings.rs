//! Host-side bindings of the plugin contracts gocp supports, and the one
//! place that knows they differ: `wit/gocp.wit` (gocp:cache@0.2.0, entries
//! carry host data) and the one before it, kept in `host/wit/v0.1`
//! (gocp:cache@0.1.0). The rest of the runtime sees [`Pre`], [`Exports`] and
//! the plain types here, whichever contract a plugin was built for. The
//! `wasi:io` types are wasmtime-wasi's own, so body streams are ordinary WASI
//! streams to a plugin of either contract.

use anyhow::{Result, anyhow};
use wasmtime::component::{InstancePre, Resource};
use wasmtime::{AsContextMut, Store};
use wasmtime_wasi::p2::{DynInputStream, DynOutputStream};

mod v0_2 {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "gocp:cache/plugin",
        with: { "wasi:io": wasmtime_wasi::p2::bindings::io },
        require_store_data_send: true,
    });
}

mod v0_1 {
    wasmtime::component::bindgen!({
        path: "wit/v0.1",
        world: "gocp:cache/plugin",
        with: { "wasi:io": wasmtime_wasi::p2::bindings::io },
        require_store_data_send: true,
    });
}

/// What a plugin says it is (`info` in the WIT file).
#[derive(Debug, Clone)]
pub struct Info {
    pub name: String,
    pub version: String,
    pub summary: String,
    pub max_instances: u32,
    pub config_keys: Vec<ConfigKey>,
}

#[derive(Debug, Clone)]
pub struct ConfigKey {
    pub name: String,
    pub help: String,
}

/// What `open` found out (`capabilities` in the WIT file).
#[derive(Debug, Clone, Copy)]
pub struct Capabilities {
    pub stores_bodies: bool,
}

/// A plugin's own error (`error` in the WIT file).
pub enum Error {
    NotFound,
    Unavailable(String),
    Broken(String),
    InvalidConfig(String),
}

/// An entry as it crosses the boundary (`entry` in the WIT file), unchecked.
pub struct WireEntry {
    pub output_id: Vec<u8>,
    pub size: u64,
    pub put_time_ns: u64,
    /// Always empty from and to a plugin of the 0.1 contract.
    pub host_data: Vec<u8>,
}

/// The plain types from each contract's generated ones.
macro_rules! conversions {
    ($v:ident, entry_in: $entry_in:expr, entry_out: $entry_out:expr) => {
        impl From<$v::exports::gocp::cache::backend::Info> for Info {
            fn from(i: $v::exports::gocp::cache::backend::Info) -> Info {
                Info {
                    name: i.name,
                    version: i.version,
                    summary: i.summary,
                    max_instances: i.max_instances,
                    config_keys: i.config_keys.into_iter().map(|k| ConfigKey { name: k.name, help: k.help }).collect(),
                }
            }
        }

        impl From<$v::exports::gocp::cache::backend::Error> for Error {
            fn from(e: $v::exports::gocp::cache::backend::Error) -> Error {
                use $v::exports::gocp::cache::backend::Error as E;
                match e {
                    E::NotFound => Error::NotFound,
                    E::Unavailable(m) => Error::Unavailable(m),
                    E::Broken(m) => Error::Broken(m),
                    E::InvalidConfig(m) => Error::InvalidConfig(m),
                }
            }
        }

        impl From<$v::exports::gocp::cache::backend::Entry> for WireEntry {
            fn from(e: $v::exports::gocp::cache::backend::Entry) -> WireEntry {
                $entry_in(e)
            }
        }

        impl From<&WireEntry> for $v::exports::gocp::cache::backend::Entry {
            fn from(e: &WireEntry) -> Self {
                $entry_out(e)
            }
        }
    };
}

conversions!(
    v0_2,
    entry_in: |e: v0_2::exports::gocp::cache::backend::Entry| WireEntry {
        output_id: e.output_id,
        size: e.size,
        put_time_ns: e.put_time_ns,
        host_data: e.host_data,
    },
    entry_out: |e: &WireEntry| v0_2::exports::gocp::cache::backend::Entry {
        output_id: e.output_id.clone(),
        size: e.size,
        put_time_ns: e.put_time_ns,
        host_data: e.host_data.clone(),
    }
);

conversions!(
    v0_1,
    entry_in: |e: v0_1::exports::gocp::cache::backend::Entry| WireEntry {
        output_id: e.output_id,
        size: e.size,
        put_time_ns: e.put_time_ns,
        host_data: Vec::new(),
    },
    entry_out: |e: &WireEntry| v0_1::exports::gocp::cache::backend::Entry {
        output_id: e.output_id.clone(),
        size: e.size,
        put_time_ns: e.put_time_ns,
    }
);

/// A plugin ready to instantiate, of whichever contract it exports.
pub enum Pre<T: 'static> {
    V0_2(v0_2::PluginPre<T>),
    V0_1(v0_1::PluginPre<T>),
}

impl<T: Send + 'static> Pre<T> {
    /// The newest contract the component exports.
    pub fn new(pre: InstancePre<T>) -> Result<Pre<T>> {
        let newest = match v0_2::PluginPre::new(pre.clone()) {
            Ok(p) => return Ok(Pre::V0_2(p)),
            Err(e) => e,
        };
        v0_1::PluginPre::new(pre).map(Pre::V0_1).map_err(|_| {
            anyhow!(
                "not a gocp plugin (it must export gocp:cache/backend@0.2.0, or @0.1.0 for older plugins): {newest:#}"
            )
        })
    }

    /// The contract's version, for messages.
    pub fn contract(&self) -> &'static str {
        match self {
            Pre::V0_2(_) => "gocp:cache@0.2.0",
            Pre::V0_1(_) => "gocp:cache@0.1.0",
        }
    }

    /// Whether entries keep the host's data (signatures) through this plugin.
    pub fn carries_host_data(&self) -> bool {
        matches!(self, Pre::V0_2(_))
    }

    pub fn instantiate(&self, store: &mut Store<T>) -> wasmtime::Result<Exports> {
        Ok(match self {
            Pre::V0_2(p) => Exports::V0_2(p.instantiate(store)?),
            Pre::V0_1(p) => Exports::V0_1(p.instantiate(store)?),
        })
    }
}

/// An instance's exports, of whichever contract.
pub enum Exports {
    V0_2(v0_2::Plugin),
    V0_1(v0_1::Plugin),
}

/// The same call on either contract, its answer in the plain types.
macro_rules! call {
    ($self:ident, |$b:ident| $call:expr) => {
        match $self {
            Exports::V0_2(p) => {
                let $b = p.gocp_cache_backend();
                $call.map(|r| r.map(Into::into).map_err(Into::into))
            }
            Exports::V0_1(p) => {
                let $b = p.gocp_cache_backend();
                $call.map(|r| r.map(Into::into).map_err(Into::into))
            }
        }
    };
}

type Answer<T> = wasmtime::Result<Result<T, Error>>;

impl Exports {
    pub fn describe(&self, store: impl AsContextMut<Data: Send>) -> wasmtime::Result<Info> {
        match self {
            Exports::V0_2(p) => p.gocp_cache_backend().call_describe(store).map(Into::into),
            Exports::V0_1(p) => p.gocp_cache_backend().call_describe(store).map(Into::into),
        }
    }

    pub fn open(&self, store: impl AsContextMut<Data: Send>, config: &[(String, String)]) -> Answer<Capabilities> {
        match self {
            Exports::V0_2(p) => p
                .gocp_cache_backend()
                .call_open(store, config)
                .map(|r| r.map(|c| Capabilities { stores_bodies: c.stores_bodies }).map_err(Into::into)),
            Exports::V0_1(p) => p
                .gocp_cache_backend()
                .call_open(store, config)
                .map(|r| r.map(|c| Capabilities { stores_bodies: c.stores_bodies }).map_err(Into::into)),
        }
    }

    pub fn read_entry(&self, store: impl AsContextMut<Data: Send>, action_id: &[u8]) -> Answer<WireEntry> {
        call!(self, |b| b.call_read_entry(store, &action_id.to_vec()))
    }

    pub fn write_entry(&self, store: impl AsContextMut<Data: Send>, action_id: &[u8], entry: &WireEntry) -> Answer<()> {
        call!(self, |b| b.call_write_entry(store, &action_id.to_vec(), &entry.into()))
    }

    pub fn read_body(
        &self,
        store: impl AsContextMut<Data: Send>,
        output_id: &[u8],
        size: u64,
        sink: Resource<DynOutputStream>,
    ) -> Answer<()> {
        call!(self, |b| b.call_read_body(store, &output_id.to_vec(), size, sink))
    }

    pub fn write_body(
        &self,
        store: impl AsContextMut<Data: Send>,
        output_id: &[u8],
        size: u64,
        body: Resource<DynInputStream>,
    ) -> Answer<()> {
        call!(self, |b| b.call_write_body(store, &output_id.to_vec(), size, body))
    }

    pub fn finish(&self, store: impl AsContextMut<Data: Send>) -> Answer<()> {
        call!(self, |b| b.call_finish(store))
    }
}
