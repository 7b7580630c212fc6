//! gocp-host: serves the go command's build cache (GOCACHEPROG) from a cache
//! backend plugin, a sandboxed WebAssembly component.
//!
//! A request flows `protocol` (decode) -> `server` (policy, threads) ->
//! `store` (the local files the go command reads) and `plugin` (the backend).
//! `cli` sets it all up; `stats` counts; `breaker` pauses a failing plugin.

pub mod breaker;
pub mod cli;
pub mod plugin;
pub mod protocol;
pub mod server;
pub mod stats;
pub mod store;
