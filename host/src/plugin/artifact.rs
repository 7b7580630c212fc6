//! Compiled plugins, kept between runs.
//!
//! Compiling a component takes tens to hundreds of milliseconds, and the go
//! command starts gocp-host on every invocation. So the compiled code is saved
//! in the state directory under a name derived from the wasm's SHA-256, the
//! gocp and wasmtime versions and the engine settings, and later runs map it in
//! directly. Loading compiled code is unsafe if the file came from elsewhere,
//! so this module only loads files under that exact name, owned by this user
//! and writable by nobody else, in a directory only it writes to. Nor may a
//! file damaged since it was written be run (a flipped bit in machine code
//! crashes the process, every go command with it): each artifact has a
//! checksum beside it, `<name>.crc`, checked before it is mapped, and a
//! damaged or unchecked artifact is compiled again.

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
        && checksum_holds(&path)
        && let Ok(Some(Precompiled::Component)) = Engine::detect_precompiled_file(&path)
    {
        // SAFETY: the file is at the name this host derived for these exact
        // bytes and engine, in its own private directory, owned by this user
        // and not writable by others, and has the checksum `save` wrote for
        // it: it is what `save` below wrote. A damaged or stale artifact is
        // rebuilt below, never fatal.
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

fn checksum_path(path: &Path) -> PathBuf {
    path.with_extension("crc")
}

/// What the checksum file holds for `bytes`.
fn checksum(bytes: &[u8]) -> String {
    format!("crc32 {:08x} {}\n", crc32fast::hash(bytes), bytes.len())
}

/// Whether the artifact still has the checksum written beside it. The file
/// is mapped rather than read: it is in the page cache, and wasmtime maps it
/// again right after.
fn checksum_holds(path: &Path) -> bool {
    let Ok(expected) = fs::read_to_string(checksum_path(path)) else { return false };
    let Ok(file) = fs::File::open(path) else { return false };
    let Ok(len) = file.metadata().map(|m| m.len() as usize) else { return false };
    if len == 0 {
        return false;
    }
    // SAFETY: a private, read-only mapping of a file only this user can
    // write, unmapped before returning; only read as bytes.
    let Ok(map) = (unsafe {
        rustix::mm::mmap(
            std::ptr::null_mut(),
            len,
            rustix::mm::ProtFlags::READ,
            rustix::mm::MapFlags::PRIVATE,
            &file,
            0,
        )
    }) else {
        return false;
    };
    // SAFETY: the mapping above is `len` readable bytes and lives until munmap.
    let actual = checksum(unsafe { std::slice::from_raw_parts(map.cast::<u8>(), len) });
    // SAFETY: unmapping exactly what was mapped; the slice is gone.
    let _ = unsafe { rustix::mm::munmap(map, len) };
    actual == expected
}

fn is_ours(path: &Path) -> bool {
    let Ok(meta) = fs::symlink_metadata(path) else { return false };
    meta.is_file() && meta.uid() == rustix::process::geteuid().as_raw() && meta.mode() & 0o022 == 0
}

/// Writes the checksum, then the artifact, each by renaming a complete
/// file: a crash in between leaves a checksum that fails, never an
/// artifact that passes unchecked.
fn save(path: &Path, compiled: &[u8]) -> Result<()> {
    let dir = path.parent().expect("artifact paths have a parent");
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let sum = checksum(compiled);
    for (target, bytes) in [(checksum_path(path), sum.as_bytes()), (path.to_path_buf(), compiled)] {
        let mut tmp = tempfile::Builder::new().permissions(fs::Permissions::from_mode(0o600)).tempfile_in(dir)?;
        tmp.write_all(bytes)?;
        tmp.persist(target)?;
    }
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
