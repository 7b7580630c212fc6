//! Loading plugins: mistakes fail fast with one clear line, compiled plugins
//! are reused between runs and rebuilt when they cannot be trusted.

mod support;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde_json::json;
use support::*;

/// Runs gocp-host expecting a start-up failure; returns its one stderr line.
fn fails_to_start(args: &[&str]) -> String {
    let out = run_host(args);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(out.stdout.is_empty(), "nothing on stdout when failing to start");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

#[test]
fn configuration_mistakes_fail_fast_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();

    let e = fails_to_start(&["--dir", d, "--plugin", "nosuch"]);
    assert!(e.contains("no such file") && e.contains("disk, memory"), "{e}");

    let e = fails_to_start(&["--dir", d, "--config", "max-bytes=lots", "--plugin", "memory"]);
    assert!(e.contains("invalid configuration") && e.contains("max-bytes=lots"), "{e}");

    let e = fails_to_start(&["--dir", d, "--config", "colour=blue"]);
    assert!(e.contains("unknown configuration key(s): colour"), "{e}");

    let e = fails_to_start(&["--dir", d, "--config", "novalue"]);
    assert!(e.contains("KEY=VALUE"), "{e}");

    let text_file = dir.path().join("notes.wasm");
    fs::write(&text_file, "just some text").unwrap();
    let e = fails_to_start(&["--dir", d, "--plugin", text_file.to_str().unwrap()]);
    assert!(e.contains("not a WebAssembly file"), "{e}");

    let core = dir.path().join("core.wasm");
    fs::write(&core, b"\0asm\x01\0\0\0").unwrap();
    let e = fails_to_start(&["--dir", d, "--plugin", core.to_str().unwrap()]);
    assert!(e.contains("core WebAssembly module, not a component"), "{e}");

    let unreadable = dir.path().join("dir.wasm");
    fs::create_dir(&unreadable).unwrap();
    let e = fails_to_start(&["--dir", d, "--plugin", unreadable.to_str().unwrap()]);
    assert!(e.contains("reading"), "{e}");
}

#[test]
fn a_component_of_another_world_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = test_plugin("wrong-world");
    let e = fails_to_start(&["--dir", dir.path().to_str().unwrap(), "--plugin", wasm.to_str().unwrap()]);
    assert!(e.contains("not a gocp plugin"), "{e}");
}

fn artifacts(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir.join("compiled")).unwrap().map(|e| e.unwrap().path()).collect();
    v.sort();
    v
}

fn serve_one_get(dir: &Path) {
    let (mut s, caps) = Session::start(&["--dir", dir.to_str().unwrap()]);
    assert_eq!(caps["ID"], json!(0));
    s.send_get(1, &sha256(b"x"));
    assert_eq!(s.recv()["Miss"], json!(true));
    let (status, _, stderr) = s.finish();
    assert!(status.success(), "{stderr}");
}

#[test]
fn compiled_plugins_are_reused_and_rebuilt_when_untrustworthy() {
    let dir = tempfile::tempdir().unwrap();
    serve_one_get(dir.path());
    let first = artifacts(dir.path());
    assert_eq!(first.len(), 1, "one compiled plugin: {first:?}");
    let path = &first[0];
    let meta = fs::metadata(path).unwrap();
    assert_eq!(meta.mode() & 0o077, 0, "private to the user");

    // Reused as it is: same file, untouched.
    serve_one_get(dir.path());
    let again = fs::metadata(path).unwrap();
    assert_eq!((again.ino(), again.mtime_nsec()), (meta.ino(), meta.mtime_nsec()));

    // Damaged: rebuilt, and serving still works.
    fs::write(path, b"not compiled code").unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
    serve_one_get(dir.path());
    assert!(fs::metadata(path).unwrap().len() > 1000, "rebuilt");

    // Writable by others: not trusted, so replaced by a fresh private one.
    fs::set_permissions(path, fs::Permissions::from_mode(0o666)).unwrap();
    let before = fs::metadata(path).unwrap().ino();
    serve_one_get(dir.path());
    let after = fs::metadata(path).unwrap();
    assert_ne!(after.ino(), before, "replaced");
    assert_eq!(after.mode() & 0o077, 0);
}

#[test]
fn help_explains_the_flags_and_environment() {
    let out = run_host(&["--help"]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    for needle in
        ["--plugin", "GOCP_PLUGIN", "--config", "--dir", "--allow-dir", "--verbose", "--stats-json", "GOCACHEPROG="]
    {
        assert!(help.contains(needle), "--help lacks {needle}");
    }
}

#[test]
fn plugin_test_passes_the_built_in_plugins_and_fails_a_lying_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    for name in ["disk", "memory"] {
        let out = run_host(&["--dir", d, "plugin-test", name]);
        let table = text(&out.stdout);
        assert!(out.status.success(), "{name}:\n{table}{}", text(&out.stderr));
        assert!(table.contains(", 0 failed"), "{table}");
        assert!(!table.contains("FAIL"), "{table}");
    }
    assert!(
        text(&run_host(&["--dir", d, "plugin-test", "memory"]).stdout)
            .contains("write-body then read-body, 8388608 bytes")
    );

    // A plugin that answers every lookup with the same made-up entry and
    // writes bytes that do not match: the kit names what is wrong, exit 1.
    let hostile = test_plugin("hostile");
    let out = run_host(&["--dir", d, "plugin-test", hostile.to_str().unwrap(), "--config", "attack=wrong-bytes"]);
    let table = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{table}");
    assert!(table.contains("FAIL  read-entry of an unknown action is not-found"), "{table}");
    assert!(table.contains("do not hash to the output id"), "{table}");
    // The scratch state of the checks never lands in the user's state directory.
    assert!(!dir.path().join("plugins").exists());
}
