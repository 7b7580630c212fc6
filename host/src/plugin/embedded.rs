//! The plugins built into the binary (by build.rs), selectable by name.

#[derive(Debug)]
pub struct EmbeddedPlugin {
    pub name: &'static str,
    pub wasm: &'static [u8],
    /// SHA-256 of `wasm`, computed at build time so start-up does not hash it.
    pub sha256: [u8; 32],
}

include!(concat!(env!("OUT_DIR"), "/embedded.rs"));

pub fn find(name: &str) -> Option<&'static EmbeddedPlugin> {
    EMBEDDED.iter().find(|p| p.name == name)
}

pub fn names() -> impl Iterator<Item = &'static str> {
    EMBEDDED.iter().map(|p| p.name)
}
