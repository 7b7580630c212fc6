//! The example plugins in other languages (examples/python-dir, examples/js-dir,
//! examples/go-dir), built from source with their real toolchains by their own
//! one-command build scripts, checked with `gocp-host plugin-test`, and serving
//! real go builds; and the Go SDK under them (sdk/go): its own tests, its
//! generated parts against what they were made from, and a stress test of its
//! garbage-collector discipline.
//!
//! Each example keeps bodies, so the warm build runs with a fresh local store
//! (a second machine sharing the plugin's directory): its outputs can only come
//! through the plugin's read-entry and read-body. These tests never change an
//! example; they build into a temporary directory.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

/// Bounds for one build of an example (an interpreter is snapshotted into
/// the component: tens of seconds on a busy 2-core machine) and for one go
/// command (the first start of a fresh state directory compiles the
/// tens-of-MB component with Cranelift).
const BUILD_TIMEOUT: Duration = Duration::from_secs(600);
const GO_TIMEOUT: Duration = Duration::from_secs(600);

/// What a bounded command did.
struct Ran {
    success: bool,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

/// Runs `cmd` to completion within `limit` (see `support::Bounded`).
fn run_bounded(mut cmd: Command, limit: Duration) -> Ran {
    let started = Instant::now();
    let out = cmd.stdin(Stdio::null()).output_within(limit);
    Ran {
        success: out.status.success(),
        stdout: text(&out.stdout),
        stderr: text(&out.stderr),
        elapsed: started.elapsed(),
    }
}

/// Builds `examples/NAME` with its own `build.sh` into `out_dir`, with the
/// tools `.ci/tools/*.sh` installed, and returns the component.
fn build_example(name: &str, toolchain: &str, out_dir: &Path) -> PathBuf {
    // Fails with the install script to run when the toolchain is missing.
    let tool_path = tool(toolchain);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = out_dir.join(format!("{name}.wasm"));
    let mut cmd = Command::new("bash");
    cmd.arg(root.join("examples").join(name).join("build.sh"))
        .arg(&out)
        .env("GOCP_TEST_TOOLS", tools_dir())
        .env("PATH", prepend_path(tool_path.parent().unwrap()));
    let ran = run_bounded(cmd, BUILD_TIMEOUT);
    assert!(ran.success, "examples/{name}/build.sh failed:\n{}{}", ran.stdout, ran.stderr);
    let size = fs::metadata(&out).unwrap_or_else(|e| panic!("{}: {e}", out.display())).len();
    eprintln!("examples/{name}: built in {:.1} s, {:.1} MB", ran.elapsed.as_secs_f64(), size as f64 / 1e6);
    out
}

fn prepend_path(dir: &Path) -> std::ffi::OsString {
    let rest = std::env::var_os("PATH").unwrap_or_default();
    std::env::join_paths(std::iter::once(dir.to_path_buf()).chain(std::env::split_paths(&rest))).unwrap()
}

fn stats(path: &Path) -> Value {
    serde_json::from_slice(&fs::read(path).expect("--stats-json was written")).unwrap()
}

fn go_bounded(dir: &Path, gocache: &Path, prog: &str, args: &[&str]) -> Ran {
    run_bounded(go_command(dir, gocache, Some(prog), args), GO_TIMEOUT)
}

/// The whole story of one example: build, plugin-test, cold build and test,
/// then warm build and test on a fresh local store and fresh GOCACHEs.
fn example_end_to_end(name: &str, toolchain: &str) {
    require_go();
    let tmp = tempfile::tempdir().unwrap();
    let wasm = build_example(name, toolchain, tmp.path());
    let wasm_arg = wasm.to_str().unwrap();

    // The contract's checks, as a plugin author runs them.
    let mut check = Command::new(BIN);
    check.args(["plugin-test", wasm_arg, "--dir"]).arg(tmp.path().join("plugin-test-state"));
    let checked = run_bounded(check, GO_TIMEOUT);
    assert!(checked.success, "plugin-test of {name}:\n{}{}", checked.stdout, checked.stderr);
    assert!(checked.stdout.contains(" 0 failed"), "{}", checked.stdout);
    assert_current_contract(&checked.stdout);
    eprintln!("examples/{name}: plugin-test passed in {:.1} s", checked.elapsed.as_secs_f64());

    let module = tmp.path().join("module");
    write_module(&module);
    let shared = tmp.path().join("shared");
    fs::create_dir(&shared).unwrap();
    let prog = |state: &str, stats: &str| {
        format!(
            "{BIN} --plugin {wasm_arg} --config path=/shared --allow-dir {}:/shared --dir {} --stats-json {}",
            shared.display(),
            tmp.path().join(state).display(),
            tmp.path().join(stats).display()
        )
    };

    // Cold: everything compiled and tested, outputs stored through the plugin.
    let cold_prog = prog("state-cold", "cold.json");
    let cold = go_bounded(&module, &tmp.path().join("gocache-cold"), &cold_prog, &["build", "-x", "./..."]);
    assert!(cold.success, "{}", cold.stderr);
    assert!(compile_steps(&cold.stderr).len() >= 4, "a cold build compiles");
    let cold_stats = stats(&tmp.path().join("cold.json"));
    assert!(cold_stats["puts"].as_u64().unwrap() > 0, "{cold_stats}");
    eprintln!(
        "examples/{name}: cold go build {:.1} s (first start compiles the component), {cold_stats}",
        cold.elapsed.as_secs_f64()
    );
    let cold_test = go_bounded(&module, &tmp.path().join("gocache-cold"), &cold_prog, &["test", "./..."]);
    assert!(cold_test.success, "{}{}", cold_test.stdout, cold_test.stderr);
    assert!(!cold_test.stdout.contains("(cached)"), "{}", cold_test.stdout);
    assert_eq!(stats(&tmp.path().join("cold.json"))["plugin_errors"].as_u64(), Some(0));

    // Warm: a fresh local store and GOCACHE, so every output comes from the
    // plugin's directory, and nothing is compiled.
    let warm_prog = prog("state-warm", "warm.json");
    let warm = go_bounded(&module, &tmp.path().join("gocache-warm"), &warm_prog, &["build", "-x", "./..."]);
    assert!(warm.success, "{}", warm.stderr);
    let compiles = compile_steps(&warm.stderr);
    assert!(compiles.is_empty(), "warm build through {name} compiled:\n{}", compiles.join("\n"));
    let warm_stats = stats(&tmp.path().join("warm.json"));
    assert!(warm_stats["hits"].as_u64().unwrap() > 0, "{warm_stats}");
    let from_plugin = warm_stats["hits_fetched"].as_u64().unwrap() + warm_stats["prefetched"].as_u64().unwrap();
    assert!(from_plugin > 0, "bodies came from the plugin: {warm_stats}");
    assert_eq!(warm_stats["plugin_errors"].as_u64(), Some(0), "{warm_stats}");
    assert_eq!(warm_stats["rejected_bodies"].as_u64(), Some(0), "{warm_stats}");
    eprintln!("examples/{name}: warm go build {:.1} s, {warm_stats}", warm.elapsed.as_secs_f64());

    let warm_test = go_bounded(&module, &tmp.path().join("gocache-warm-test"), &warm_prog, &["test", "./..."]);
    assert!(warm_test.success, "{}{}", warm_test.stdout, warm_test.stderr);
    let results: Vec<&str> = warm_test.stdout.lines().filter(|l| l.starts_with("ok")).collect();
    assert_eq!(results.len(), 3, "{}", warm_test.stdout);
    assert!(results.iter().all(|l| l.contains("(cached)")), "test results not cached:\n{}", warm_test.stdout);
    eprintln!(
        "examples/{name}: warm go test {:.1} s, {}",
        warm_test.elapsed.as_secs_f64(),
        stats(&tmp.path().join("warm.json"))
    );

    // Quiet: nothing of gocp's own reached the build output.
    assert!(!warm.stderr.contains("gocp:"), "{}", warm.stderr);
}

#[test]
fn python_example_builds_passes_plugin_test_and_serves_a_warm_go_build() {
    example_end_to_end("python-dir", "componentize-py");
}

#[test]
fn javascript_example_builds_passes_plugin_test_and_serves_a_warm_go_build() {
    example_end_to_end("js-dir", "componentize-js");
}

#[test]
fn go_example_builds_passes_plugin_test_and_serves_a_warm_go_build() {
    example_end_to_end("go-dir", "wasm-tools");
}

/// `examples/new-plugin.sh LANGUAGE` into `tmp`, then the copy's own
/// `build.sh` (which needs `toolchain`) and plugin-test, as a newcomer runs
/// them; returns the copy's directory.
fn copy_made_by_new_plugin_builds_and_passes_plugin_test(language: &str, toolchain: &str, tmp: &Path) -> PathBuf {
    let copy = tmp.join("blob-store");
    let mut new = Command::new("bash");
    new.arg(repository_root().join("examples/new-plugin.sh")).arg(language).arg(&copy);
    let made = run_bounded(new, BUILD_TIMEOUT);
    assert!(made.success, "{}{}", made.stdout, made.stderr);
    assert!(made.stdout.contains("build.sh"), "it says what to do next: {}", made.stdout);

    // What the newcomer runs next, with no path back into this repository.
    let tool_path = tool(toolchain);
    let mut build = Command::new(copy.join("build.sh"));
    build.env("GOCP_TEST_TOOLS", tools_dir()).env("PATH", prepend_path(tool_path.parent().unwrap()));
    let built = run_bounded(build, BUILD_TIMEOUT);
    assert!(built.success, "{}{}", built.stdout, built.stderr);
    let wasm = copy.join("build").join("blob-store.wasm");
    assert!(wasm.is_file(), "{} was not built", wasm.display());

    let mut check = Command::new(BIN);
    check.args(["plugin-test", "--plugin"]).arg(&wasm).arg("--dir").arg(tmp.join("state"));
    let checked = run_bounded(check, GO_TIMEOUT);
    assert!(checked.success, "{}{}", checked.stdout, checked.stderr);
    assert!(checked.stdout.contains("conformance of blob-store 0.1.0"), "renamed: {}", checked.stdout);
    assert!(checked.stdout.contains(" 0 failed"), "{}", checked.stdout);
    assert_current_contract(&checked.stdout);
    copy
}

/// A plugin of the previous contract passes plugin-test as well (it has no
/// host data to keep), so what plugin-test says it was built for is checked.
fn assert_current_contract(plugin_test_stdout: &str) {
    assert!(
        plugin_test_stdout.contains("(gocp:cache@0.2.0)"),
        "built for the current contract, gocp:cache@0.2.0: {plugin_test_stdout}"
    );
}

#[test]
fn a_copy_made_by_new_plugin_builds_outside_the_repository_and_passes_plugin_test() {
    let tmp = tempfile::tempdir().unwrap();
    copy_made_by_new_plugin_builds_and_passes_plugin_test("python", "componentize-py", tmp.path());
}

#[test]
fn a_go_copy_made_by_new_plugin_builds_outside_the_repository_and_passes_plugin_test() {
    let tmp = tempfile::tempdir().unwrap();
    let copy = copy_made_by_new_plugin_builds_and_passes_plugin_test("go", "wasm-tools", tmp.path());
    let go_mod = fs::read_to_string(copy.join("go.mod")).unwrap();
    assert!(go_mod.contains("module gocp-example/blob-store\n"), "{go_mod}");
    assert!(go_mod.contains("replace gocp/plugin => ./gocp-sdk\n"), "the copy builds on its own SDK: {go_mod}");
    assert!(!go_mod.contains(".."), "no path back into the repository: {go_mod}");
    assert!(!copy.join("gocp-sdk/regenerate.sh").exists(), "regenerating the SDK is the repository's job");
}

fn repository_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The SDK's own tests (plain Go: configuration, entries, errors, call
/// checks), and `go vet` of its hand-written WebAssembly side, which only
/// builds for wasip1 (the generated glue converts between integers and
/// pointers throughout, as the canonical ABI does, which vet flags).
#[test]
fn go_sdk_unit_tests_and_vet_pass() {
    require_go();
    let sdk = repository_root().join("sdk/go");
    let mut test = Command::new("go");
    test.args(["test", "-count=1", "."]).current_dir(&sdk).env("GOWORK", "off");
    let tested = run_bounded(test, BUILD_TIMEOUT);
    assert!(tested.success, "{}{}", tested.stdout, tested.stderr);
    let mut vet = Command::new("go");
    vet.args(["vet", ".", "./internal/wit/export_gocp_cache_backend"])
        .current_dir(&sdk)
        .env("GOOS", "wasip1")
        .env("GOARCH", "wasm")
        .env("GOWORK", "off");
    let vetted = run_bounded(vet, BUILD_TIMEOUT);
    assert!(vetted.success, "{}{}", vetted.stdout, vetted.stderr);
}

/// The SDK's generated bindings and adapter are committed; this notices when
/// wit/ or the host's wasmtime moved on without `sdk/go/regenerate.sh`.
#[test]
fn go_sdk_bindings_and_adapter_match_the_contract_and_the_hosts_wasmtime() {
    let root = repository_root();
    let regenerate = "run sdk/go/regenerate.sh (see sdk/go/README.md)";

    let recorded = fs::read_to_string(root.join("sdk/go/internal/wit/SOURCE")).unwrap();
    let mut listed: Vec<String> = Vec::new();
    for line in recorded.lines().skip(1) {
        let (sum, path) = line.split_once("  ").unwrap_or_else(|| panic!("a line of internal/wit/SOURCE: {line:?}"));
        let now = hex(&sha256(&fs::read(root.join(path)).unwrap()));
        assert_eq!(sum, now, "{path} changed since the Go bindings were generated: {regenerate}");
        listed.push(path.to_string());
    }
    let mut wit_files: Vec<String> = files_under(&root.join("wit"))
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "wit"))
        .map(|p| p.strip_prefix(root).unwrap().to_str().unwrap().to_string())
        .collect();
    wit_files.sort();
    listed.sort();
    assert_eq!(listed, wit_files, "the WIT files the Go bindings were made from: {regenerate}");

    let cargo_toml = fs::read_to_string(root.join("host/Cargo.toml")).unwrap();
    let wasmtime = cargo_toml
        .lines()
        .find_map(|l| l.strip_prefix("wasmtime = { version = \"="))
        .and_then(|rest| rest.split('"').next())
        .expect("host/Cargo.toml pins wasmtime exactly");
    let source = fs::read_to_string(root.join("sdk/go/adapter/SOURCE")).unwrap();
    let fields: Vec<&str> = source.split_whitespace().collect();
    assert_eq!(fields.get(1), Some(&wasmtime), "the adapter is not of the host's wasmtime: {regenerate}");
    let adapter = fs::read(root.join("sdk/go/adapter/wasi_snapshot_preview1.reactor.wasm")).unwrap();
    assert_eq!(fields.last().copied(), Some(format!("sha256:{}", hex(&sha256(&adapter))).as_str()), "{source}");
}

/// Bodies of the stress test: thousands, mostly small, some empty, a few of
/// 1-8 MiB and six of 64 MiB (about 600 MiB in all).
const STRESS_BODIES: usize = 3000;

fn stress_size(i: usize) -> u64 {
    if i.is_multiple_of(500) {
        64 << 20
    } else if i % 100 == 50 {
        ((i / 100) % 8 + 1) as u64 * (1 << 20) + i as u64
    } else if i.is_multiple_of(7) {
        0
    } else {
        (i as u64 * 7919) % 65_536
    }
}

/// Body `i`'s bytes, `buf.len()` at a time: a pseudo-random stream of its own,
/// the same however it is cut, as long as every piece but the last is a
/// multiple of 8 bytes long.
fn stress_fill(state: &mut u64, buf: &mut [u8]) {
    for chunk in buf.chunks_mut(8) {
        *state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
}

fn stress_output(i: usize) -> [u8; 32] {
    let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
    let (mut state, mut left, mut chunk) = (i as u64, stress_size(i), vec![0u8; 3 << 20]);
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        stress_fill(&mut state, &mut chunk[..n]);
        sha2::Digest::update(&mut hasher, &chunk[..n]);
        left -= n as u64;
    }
    sha2::Digest::finalize(hasher).into()
}

/// The Go SDK's garbage-collector discipline under load: every chunk of every
/// body is a Go allocation made inside cabi_realloc, where a collection would
/// trap the instance. Thousands of bodies, up to 64 MiB, go through one
/// instance of the Go example whose memory limit is below the largest body (so
/// bodies must stream and garbage must be collected), then come back through
/// one instance to a machine with an empty local store.
#[test]
fn go_plugin_stores_and_serves_thousands_of_bodies_up_to_64_mib_through_one_instance() {
    let tmp = tempfile::tempdir().unwrap();
    let wasm = build_example("go-dir", "wasm-tools", tmp.path());
    let shared = tmp.path().join("shared");
    fs::create_dir(&shared).unwrap();
    let grant = format!("{}:/shared", shared.display());
    let args = |state: &str| -> Vec<String> {
        let state = tmp.path().join(state);
        let mut args: Vec<String> = [
            "--plugin",
            wasm.to_str().unwrap(),
            "--config",
            "path=/shared",
            "--allow-dir",
            &grant,
            "--instances",
            "1",
            "--plugin-memory",
            "48MiB",
            // Generous: this is about traps, not speed, on a busy machine.
            "--plugin-timeout",
            "120s",
            "--drain-timeout",
            "600s",
            "--stats-json",
        ]
        .map(String::from)
        .to_vec();
        args.push(state.with_extension("json").to_str().unwrap().to_string());
        args.push("--dir".into());
        args.push(state.to_str().unwrap().to_string());
        args
    };
    let action = |i: usize| sha256(format!("go stress action {i}").as_bytes());
    let started = Instant::now();

    let writer_args = args("writer");
    let (mut s, _) = Session::start(&writer_args.iter().map(String::as_str).collect::<Vec<_>>());
    for i in 0..STRESS_BODIES {
        let size = stress_size(i);
        if size == 0 {
            s.send_put(i as i64, &action(i), &[]);
        } else {
            let mut state = i as u64;
            s.send_put_streamed(i as i64, &action(i), &stress_output(i), size, |buf| stress_fill(&mut state, buf));
        }
        let answer = s.recv();
        assert!(answer["DiskPath"].is_string(), "put {i}: {answer}");
    }
    s.send_close(STRESS_BODIES as i64);
    let (status, _, stderr) = s.finish();
    assert!(status.success(), "{stderr}");
    let written = stats(&tmp.path().join("writer.json"));
    eprintln!("go stress: {STRESS_BODIES} puts in {:.1} s, {written}", started.elapsed().as_secs_f64());
    for counter in ["plugin_traps", "plugin_errors", "plugin_timeouts", "plugin_restarts", "local_only_puts"] {
        assert_eq!(written[counter].as_u64(), Some(0), "{counter}: {written}\n{stderr}");
    }
    assert_eq!(written["puts"].as_u64(), Some(STRESS_BODIES as u64), "{written}");

    // A machine with an empty local store: every body comes through the plugin.
    let started = Instant::now();
    let reader_args = args("reader");
    let (mut s, _) = Session::start(&reader_args.iter().map(String::as_str).collect::<Vec<_>>());
    for i in 0..STRESS_BODIES {
        s.send_get(i as i64, &action(i));
        let hit = s.recv();
        let output = stress_output(i);
        assert_eq!(hit["OutputID"].as_str(), Some(b64(&output).as_str()), "get {i}: {hit}");
        assert_eq!(hit["Size"].as_u64().unwrap_or(0), stress_size(i), "get {i}: {hit}");
        let path = hit["DiskPath"].as_str().unwrap_or_else(|| panic!("get {i}: {hit}"));
        let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
        std::io::copy(&mut fs::File::open(path).unwrap(), &mut hasher).unwrap();
        let on_disk: [u8; 32] = sha2::Digest::finalize(hasher).into();
        assert_eq!(on_disk, output, "get {i}: the body came back whole");
    }
    s.send_close(STRESS_BODIES as i64);
    let (status, _, stderr) = s.finish();
    assert!(status.success(), "{stderr}");
    let read = stats(&tmp.path().join("reader.json"));
    eprintln!("go stress: {STRESS_BODIES} gets in {:.1} s, {read}", started.elapsed().as_secs_f64());
    let failures = ["plugin_traps", "plugin_errors", "plugin_timeouts", "plugin_restarts", "rejected_bodies", "misses"];
    for counter in failures {
        assert_eq!(read[counter].as_u64(), Some(0), "{counter}: {read}\n{stderr}");
    }
    assert_eq!(read["hits"].as_u64(), Some(STRESS_BODIES as u64), "{read}");
    // Every distinct body came from the plugin: each non-empty one (each has
    // its own bytes), and the empty one they all share, once.
    let distinct = (0..STRESS_BODIES).filter(|&i| stress_size(i) > 0).count() as u64 + 1;
    assert_eq!(read["hits_fetched"].as_u64(), Some(distinct), "{read}");
    assert_eq!(read["hits_local"].as_u64(), Some(0), "{read}");
}
