//! The plugins built into the binary, selectable by name. Which ones is said
//! once, in `plugins/Cargo.toml`; `build.rs` builds and embeds them from
//! that list, and `--help`, `--plugin NAME` and `plugin-test` read it here.

#[derive(Debug)]
pub struct Builtin {
    pub name: &'static str,
    pub wasm: &'static [u8],
    /// SHA-256 of `wasm`, computed at build time so start-up does not hash it.
    pub sha256: [u8; 32],
}

include!(concat!(env!("OUT_DIR"), "/builtin.rs"));

pub fn find(name: &str) -> Option<&'static Builtin> {
    BUILTIN.iter().find(|p| p.name == name)
}

pub fn names() -> impl Iterator<Item = &'static str> {
    BUILTIN.iter().map(|p| p.name)
}
