//! Compiled plugins, kept between runs.
//!
//! Compiling a component takes tens to hundreds of milliseconds, and the go
//! command starts gocp-host on every invocation. So the compiled code is saved
//! in the state directory under a name derived from the wasm's SHA-256, the
//! gocp and wasmtime versions and the engine settings, and later runs map it in
//! directly. Loading compiled code is unsafe if the file came from elsewhere,
//! so this module only loads files under that exact name, owned by this user
//! and writable by nobody else, in a directory only it writes to.

use std::fs;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::{Engine, Precompiled};

const WASM_MAGIC: &[u8; 4] = b"\0asm";
/// The layer/version field of a component (a core module has 1, 0, 0, 0).
const COMPONENT_VERSION: [u8; 4] = [0x0d, 0x00, 0x01, 0x00];

/// Returns the component for `wasm`, compiling and saving it on first use.
/// `wasm_sha256` names the bytes (precomputed for embedded plugins).
pub fn load(engine: &Engine, wasm: &[u8], wasm_sha256: &[u8; 32], dir: &Path) -> Result<Component> {
    let path = artifact_path(engine, wasm_sha256, dir);
    if is_ours(&path)
        && let Ok(Some(Precompiled::Component)) = Engine::detect_precompiled_file(&path)
    {
        // SAFETY: the file is at the name this host derived for these exact
        // bytes and engine, in its own private directory, owned by this user
        // and not writable by others: it was written by `save` below.
        // A damaged or stale artifact is rebuilt below, never fatal.
        if let Ok(component) = unsafe { Component::deserialize_file(engine, &path) } {
            return Ok(component);
        }
    }
    check_is_component(wasm)?;
    let compiled = engine.precompile_component(wasm).map_err(anyhow::Error::from).context("compiling the plugin")?;
    // Saving is an optimisation: a read-only state dir still lets the plugin run.
    let _ = save(&path, &compiled);
    // SAFETY: these bytes were produced just now by this engine.
    unsafe { Component::deserialize(engine, &compiled) }
        .map_err(anyhow::Error::from)
        .context("loading the compiled plugin")
}

fn artifact_path(engine: &Engine, wasm_sha256: &[u8; 32], dir: &Path) -> PathBuf {
    let mut settings = DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut settings);
    let mut key = Sha256::new();
    key.update(wasm_sha256);
    key.update(env!("CARGO_PKG_VERSION").as_bytes());
    key.update(settings.finish().to_le_bytes());
    dir.join(format!("{}.cwasm", hex::encode(&key.finalize()[..20])))
}

fn is_ours(path: &Path) -> bool {
    let Ok(meta) = fs::symlink_metadata(path) else { return false };
    meta.is_file() && meta.uid() == rustix::process::geteuid().as_raw() && meta.mode() & 0o022 == 0
}

fn save(path: &Path, compiled: &[u8]) -> Result<()> {
    let dir = path.parent().expect("artifact paths have a parent");
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let mut tmp = tempfile::Builder::new().permissions(fs::Permissions::from_mode(0o600)).tempfile_in(dir)?;
    tmp.write_all(compiled)?;
    tmp.persist(path)?;
    Ok(())
}

/// Tells a core module or a non-wasm file apart from a component, so that the
/// user gets a message about what they passed rather than a parser error.
pub fn check_is_component(bytes: &[u8]) -> Result<()> {
    if bytes.len() < 8 || &bytes[..4] != WASM_MAGIC {
        bail!("not a WebAssembly file");
    }
    if bytes[4..8] != COMPONENT_VERSION {
        bail!(
            "a core WebAssembly module, not a component: build it for wasm32-wasip2 (or wrap it with `wasm-tools component new`)"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_what_is_not_a_component() {
        assert!(check_is_component(b"hello world").unwrap_err().to_string().contains("not a WebAssembly file"));
        let core = b"\0asm\x01\0\0\0";
        assert!(check_is_component(core).unwrap_err().to_string().contains("core WebAssembly module"));
        assert!(check_is_component(b"\0asm\x0d\0\x01\0").is_ok());
    }
}
