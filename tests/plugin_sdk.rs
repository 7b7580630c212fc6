//! The plugin SDK's own unit tests, and those of the disk plugin. The
//! plugins live in a workspace of their own (built for wasm32-wasip2), so
//! `cargo test` at the root reaches their tests here, running them natively.

mod support;

#[test]
fn sdk_unit_tests_pass() {
    support::plugin_crate_unit_tests("gocp-plugin-sdk");
}

#[test]
fn disk_plugin_unit_tests_pass() {
    support::plugin_crate_unit_tests("gocp-plugin-disk");
}
