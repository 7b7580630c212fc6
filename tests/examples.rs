//! The example plugins in other languages (examples/python-dir, examples/js-dir),
//! built from source with their real toolchains by their own one-command build
//! scripts, checked with `gocp-host plugin-test`, and serving real go builds.
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

/// Runs `cmd` to completion within `limit`, killing it (and failing the test)
/// if it takes longer. Output goes through files, so a chatty command can never
/// block on a full pipe while it is being waited for.
fn run_bounded(mut cmd: Command, limit: Duration, what: &str) -> Ran {
    let dir = tempfile::tempdir().unwrap();
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    cmd.stdin(Stdio::null()).stdout(fs::File::create(&out_path).unwrap()).stderr(fs::File::create(&err_path).unwrap());
    let started = Instant::now();
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("starting {what}: {e}"));
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {limit:?}; stderr:\n{}", fs::read_to_string(&err_path).unwrap());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Ran {
        success: status.success(),
        stdout: fs::read_to_string(&out_path).unwrap(),
        stderr: fs::read_to_string(&err_path).unwrap(),
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
    let ran = run_bounded(cmd, BUILD_TIMEOUT, &format!("examples/{name}/build.sh"));
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
    run_bounded(go_command(dir, gocache, Some(prog), args), GO_TIMEOUT, &format!("go {}", args.join(" ")))
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
    let checked = run_bounded(check, GO_TIMEOUT, "gocp-host plugin-test");
    assert!(checked.success, "plugin-test of {name}:\n{}{}", checked.stdout, checked.stderr);
    assert!(checked.stdout.contains(" 0 failed"), "{}", checked.stdout);
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
fn a_copy_made_by_new_plugin_builds_outside_the_repository_and_passes_plugin_test() {
    let tmp = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let copy = tmp.path().join("blob-store");
    let mut new = Command::new("bash");
    new.arg(root.join("examples/new-plugin.sh")).arg("python").arg(&copy);
    let made = run_bounded(new, BUILD_TIMEOUT, "examples/new-plugin.sh");
    assert!(made.success, "{}{}", made.stdout, made.stderr);
    assert!(made.stdout.contains("build.sh"), "it says what to do next: {}", made.stdout);

    // What the newcomer runs next, with no path back into this repository.
    let tool_path = tool("componentize-py");
    let mut build = Command::new(copy.join("build.sh"));
    build.env("GOCP_TEST_TOOLS", tools_dir()).env("PATH", prepend_path(tool_path.parent().unwrap()));
    let built = run_bounded(build, BUILD_TIMEOUT, "build.sh of the copy");
    assert!(built.success, "{}{}", built.stdout, built.stderr);
    let wasm = copy.join("build").join("blob-store.wasm");
    assert!(wasm.is_file(), "{} was not built", wasm.display());

    let mut check = Command::new(BIN);
    check.arg("plugin-test").arg(&wasm).arg("--dir").arg(tmp.path().join("state"));
    let checked = run_bounded(check, GO_TIMEOUT, "gocp-host plugin-test");
    assert!(checked.success, "{}{}", checked.stdout, checked.stderr);
    assert!(checked.stdout.contains("conformance of blob-store 0.1.0"), "renamed: {}", checked.stdout);
    assert!(checked.stdout.contains(" 0 failed"), "{}", checked.stdout);
}
