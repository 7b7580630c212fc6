//! Loading plugins and reading the configuration: mistakes fail fast with one
//! clear line, what CI templates produce (empty variables, odd spacing) does
//! not, compiled plugins are reused between runs and rebuilt when they cannot
//! be trusted, and starting never waits on DNS.

mod support;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use support::dns::SilentResolver;
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

/// The compiled plugins under a state directory (not their checksums).
fn artifacts(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir.join("compiled"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .collect();
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

    // Damaged where only running it would tell (its headers intact): a
    // flipped bit in machine code must never crash every go command.
    let mut code = fs::read(path).unwrap();
    let len = code.len();
    for b in &mut code[len / 4..len / 2] {
        *b ^= 0xff;
    }
    fs::write(path, &code).unwrap();
    serve_one_get(dir.path());
    assert_ne!(fs::read(path).unwrap(), code, "rebuilt");

    // Writable by others: not trusted, so replaced by a fresh private one.
    fs::set_permissions(path, fs::Permissions::from_mode(0o666)).unwrap();
    let before = fs::metadata(path).unwrap().ino();
    serve_one_get(dir.path());
    let after = fs::metadata(path).unwrap();
    assert_ne!(after.ino(), before, "replaced");
    assert_eq!(after.mode() & 0o077, 0);
}

#[test]
fn grants_over_the_state_directory_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    fs::create_dir_all(state.join("objects")).unwrap();
    let d = state.to_str().unwrap();
    for grant in [d.to_string(), format!("{d}/objects:/x"), "/".into(), format!("{}:/up:ro", dir.path().display())] {
        let e = fails_to_start(&["--dir", d, "--allow-dir", &grant]);
        assert!(e.contains("overlaps the state directory"), "{grant}: {e}");
    }
}

/// Serves one put and one get with `cmd` (a gocp-host command line), and
/// closes: what every go command needs to work.
fn serves(mut cmd: Command) {
    cmd.stdin(std::process::Stdio::piped());
    let (mut s, caps) = Session::start_command(cmd);
    assert_eq!(caps["KnownCommands"], json!(["get", "put", "close"]), "{caps}");
    s.send_put(1, &[3; 32], b"built");
    assert!(s.recv()["DiskPath"].is_string());
    s.send_get(2, &[3; 32]);
    assert_eq!(s.recv()["Size"], json!(5));
    s.send_close(3);
    s.recv();
    let (status, _, stderr) = s.finish();
    assert!(status.success(), "{stderr}");
    assert_eq!(stderr, "", "quiet");
}

#[test]
fn empty_variables_and_odd_spacing_do_not_fail_the_build() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let d = state.to_str().unwrap();
    let help = text(&run_host(&["--help"]).stdout);
    let mut vars: Vec<&str> =
        help.split(|c: char| !(c.is_ascii_uppercase() || c == '_')).filter(|w| w.starts_with("GOCP_")).collect();
    vars.sort();
    vars.dedup();
    assert!(vars.len() >= 15, "{vars:?}");
    // GOCP_DIR is the one a test needs set; every other one empty, each
    // alone and all at once, as a CI template leaves them.
    let without_dir: Vec<&str> = vars.iter().copied().filter(|v| *v != "GOCP_DIR").collect();
    let run = |empty: &[&str]| {
        let mut cmd = Command::new(BIN);
        cmd.env_clear().env("GOCP_DIR", d);
        for v in empty {
            cmd.env(v, "");
        }
        serves(cmd);
    };
    for var in &without_dir {
        run(&[var]);
    }
    run(&without_dir);
    let mut blank_dir = Command::new(BIN);
    blank_dir.env_clear().env("GOCP_DIR", " ").arg("--dir").arg(d);
    serves(blank_dir);

    // Lists split on any run of spaces, tabs or newlines.
    let mut spaced = Command::new(BIN);
    spaced.env_clear().env("GOCP_DIR", d).env("GOCP_CONFIG", " max-age=2d  \tmax-size=1GiB \n");
    serves(spaced);

    // A directory whose name holds a space: on the command line as one
    // argument (the go command splits GOCACHEPROG with quotes), and quoted
    // in the variable.
    let shared = dir.path().join("build cache");
    fs::create_dir(&shared).unwrap();
    let grant = format!("{}:/shared", shared.display());
    let mut flag = Command::new(BIN);
    flag.env_clear().args(["--dir", d, "--allow-dir", &grant, "--config", "path=/shared"]);
    serves(flag);
    assert!(shared.join("entries").is_dir(), "the plugin wrote into the granted directory");
    let mut quoted = Command::new(BIN);
    quoted
        .env_clear()
        .env("GOCP_ALLOW_DIR", format!("'{grant}'"))
        .env("GOCP_CONFIG", "path=/shared")
        .args(["--dir", d]);
    serves(quoted);

    let out = Command::new(BIN).env_clear().env("GOCP_CONFIG", "path='/unterminated").output_within(COMMAND_LIMIT);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("GOCP_CONFIG: unterminated"), "{}", text(&out.stderr));
}

#[test]
fn starting_never_waits_on_dns() {
    // A resolver that never answers (an offline laptop, a broken DNS), and
    // a plugin granted names that only DNS could resolve.
    let dns = SilentResolver::start();
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--dir",
        dir.path().to_str().unwrap(),
        "--plugin",
        "http",
        "--config",
        "url=http://cache.gocp-test.example:8080",
        "--allow-net",
        "cache.gocp-test.example:8080",
        "--allow-net",
        "mirror.gocp-test.example:8080",
    ];
    let started = Instant::now();
    let (mut s, caps) = Session::start_command(dns.command(&BIN, &args));
    let took = started.elapsed();
    assert_eq!(caps["ID"], json!(0));
    assert_eq!(dns.names(), Vec::<String>::new(), "nothing was resolved to start");
    assert!(took < Duration::from_secs(2), "capabilities after {took:?}");
    s.send_close(1);
    s.recv();
    let (status, _, stderr) = s.finish();
    assert!(status.success(), "{stderr}");
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
