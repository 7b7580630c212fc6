//! Host-side bindings generated from `wit/gocp.wit`. The `wasi:io` types are
//! wasmtime-wasi's own, so body streams are ordinary WASI streams to a plugin.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "gocp:cache/plugin",
    with: { "wasi:io": wasmtime_wasi::p2::bindings::io },
    require_store_data_send: true,
});

pub use exports::gocp::cache::backend::{Capabilities, Entry, Error, Info};
