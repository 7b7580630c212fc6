//! gocp-host: serves the go command's build cache (GOCACHEPROG) from a cache
//! backend plugin, a sandboxed WebAssembly component.
//!
//! A request flows `protocol` (decode) -> `server` (policy, threads) ->
//! `store` (the local files the go command reads), `local_entries` (the local
//! tier in front of a plugin that stores elsewhere) and `plugin` (the backend).
//! `cli` sets it all up; `stats` counts; `breaker` pauses a failing plugin.

pub mod breaker;
pub mod cli;
pub mod local_entries;
pub mod manifest;
pub mod plugin;
pub mod protocol;
pub mod server;
pub mod sessions;
pub mod stats;
pub mod store;
