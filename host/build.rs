//! Builds the shipped plugins (the `plugins/` workspace) for wasm32-wasip2 and
//! embeds them: `OUT_DIR/builtin.rs` lists each one's name, bytes and SHA-256.
//! Which plugins are built in is said once, in `plugins/Cargo.toml`
//! (`[workspace.metadata.gocp] builtin`).
//!
//! The plugins get a target directory of their own next to the host's, because
//! the host build holds the lock on its own; and the host's RUSTFLAGS are
//! dropped, because flags meant for the host target break a wasm build.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

const TARGET: &str = "wasm32-wasip2";

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir.parent().expect("host/ sits in the workspace root");
    let plugins_dir = root.join("plugins");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap());

    let plugins = builtin_names(&plugins_dir.join("Cargo.toml"));
    for path in ["wit", "plugins/Cargo.toml", "plugins/Cargo.lock"] {
        println!("cargo:rerun-if-changed={}", root.join(path).display());
    }
    // Every crate of the plugins workspace (the shipped plugins and the
    // libraries they use), but not its target directory, which changes with
    // every build.
    for entry in fs::read_dir(&plugins_dir).expect("reading plugins/").flatten() {
        if entry.path().is_dir() && entry.file_name() != "target" {
            println!("cargo:rerun-if-changed={}", entry.path().display());
        }
    }

    // OUT_DIR is <target>/<profile>/build/<pkg>-<hash>/out: keep the wasm build
    // beside <target>/<profile> so every host profile and rebuild shares it.
    let target_dir = out_dir.ancestors().nth(4).expect("OUT_DIR is inside the target directory").join("wasm-plugins");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    // Only the shipped plugins: a crate still being written elsewhere in the
    // workspace must not break the host's build.
    let mut args = vec!["build".to_string(), "--release".into(), "--target".into(), TARGET.into()];
    for name in &plugins {
        args.push("-p".into());
        args.push(format!("gocp-plugin-{name}"));
    }
    let output = Command::new(cargo)
        .args(&args)
        .current_dir(&plugins_dir)
        .env("CARGO_TARGET_DIR", &target_dir)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .output()
        .expect("running cargo to build the plugins");
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        if stderr.contains("target may not be installed") || stderr.contains("can't find crate for `core`") {
            panic!("the {TARGET} target is missing: run `rustup target add {TARGET}` once, then build again");
        }
        panic!("building the plugins in {} failed:\n{stderr}", plugins_dir.display());
    }

    let mut list = String::from("pub const BUILTIN: &[Builtin] = &[\n");
    for name in &plugins {
        let wasm = target_dir.join(TARGET).join("release").join(format!("gocp_plugin_{name}.wasm"));
        let bytes = fs::read(&wasm).unwrap_or_else(|e| panic!("reading {}: {e}", wasm.display()));
        let copy = out_dir.join(format!("{name}.wasm"));
        write_if_changed(&copy, &bytes);
        let hash = Sha256::digest(&bytes);
        writeln!(
            list,
            "    Builtin {{ name: {name:?}, wasm: include_bytes!({copy:?}), sha256: {:?} }},",
            hash.as_slice()
        )
        .unwrap();
    }
    list.push_str("];\n");
    write_if_changed(&out_dir.join("builtin.rs"), list.as_bytes());
}

/// The `builtin = [...]` list of `[workspace.metadata.gocp]` in the plugins'
/// Cargo.toml: one line of quoted names.
fn builtin_names(manifest: &Path) -> Vec<String> {
    let text = fs::read_to_string(manifest).unwrap_or_else(|e| panic!("reading {}: {e}", manifest.display()));
    let line = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("builtin = ["))
        .unwrap_or_else(|| panic!("{} has no `builtin = [...]` line", manifest.display()));
    let names: Vec<String> = line
        .trim_end_matches(']')
        .split(',')
        .map(|n| n.trim().trim_matches('"').to_string())
        .filter(|n| !n.is_empty())
        .collect();
    assert!(!names.is_empty(), "no built-in plugins listed in {}", manifest.display());
    names
}

/// Leaves unchanged files alone so that include_bytes! does not force a rebuild.
fn write_if_changed(path: &Path, bytes: &[u8]) {
    if fs::read(path).ok().as_deref() != Some(bytes) {
        fs::write(path, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }
}
