//! gocp-host: serves the go command's build cache (GOCACHEPROG) from a cache
//! backend, by default a plugin: a sandboxed WebAssembly component.
//!
//! A request flows `protocol` (decode) -> `serve` (policy, threads) -> `local`
//! (the files the go command reads, and the local tier's entries) and, when
//! this machine cannot answer it, `backend` (the seam), behind which `plugin`
//! runs the WebAssembly component. `cli` sets it all up; `stats` counts;
//! `manifest` is the format of what a session used; `domain` holds the
//! types they all speak of; `text` makes a backend's text safe to print;
//! `trust` signs and checks entries of a shared cache; `host_data` is the
//! format of what gocp keeps with each entry in a backend.

pub mod backend;
pub mod cli;
pub mod domain;
pub mod host_data;
pub mod local;
pub mod manifest;
pub mod plugin;
pub mod protocol;
pub mod serve;
pub mod stats;
pub mod text;
pub mod trust;
