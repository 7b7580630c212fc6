//! The plugin SDK's own unit tests. The SDK lives in the plugins workspace
//! (built for wasm32-wasip2), so `cargo test` at the root reaches them here,
//! running them natively.

mod support;

use std::process::Command;

#[test]
fn sdk_unit_tests_pass() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["test", "--lib", "-p", "gocp-plugin-sdk"])
        .current_dir(root.join("plugins"))
        .env("CARGO_TARGET_DIR", root.join("target").join("plugins-native"))
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .output()
        .expect("running cargo test for the SDK");
    let stdout = support::text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", support::text(&out.stderr));
    assert!(stdout.contains("test result: ok"), "{stdout}");
}
