//! End to end with the real go command: what a Go developer would see.

mod support;

use std::fs;
use std::path::Path;

use serde_json::Value;
use support::*;

fn gocacheprog(state: &Path, stats: &Path, extra: &str) -> String {
    format!("{BIN} --dir {} --stats-json {} {extra}", state.display(), stats.display())
}

fn stats(path: &Path) -> Value {
    serde_json::from_slice(&fs::read(path).expect("--stats-json was written")).unwrap()
}

#[test]
fn warm_build_from_the_disk_plugin_compiles_nothing_and_tests_are_cached() {
    require_go();
    let tmp = tempfile::tempdir().unwrap();
    let module = tmp.path().join("module");
    write_module(&module);
    let state = tmp.path().join("state");
    let stats_file = tmp.path().join("stats.json");
    let prog = gocacheprog(&state, &stats_file, "");

    // Cold: everything compiled, tests run, outputs stored through gocp.
    let cold = go(&module, &tmp.path().join("gocache-cold"), Some(&prog), &["build", "-x", "./..."]);
    assert!(cold.status.success(), "{}", text(&cold.stderr));
    assert!(compile_steps(&text(&cold.stderr)).len() >= 4, "a cold build compiles");
    let cold_stats = stats(&stats_file);
    assert!(cold_stats["puts"].as_u64().unwrap() > 0, "{cold_stats}");
    let test_cold = go(&module, &tmp.path().join("gocache-cold"), Some(&prog), &["test", "./..."]);
    assert!(test_cold.status.success(), "{}", text(&test_cold.stdout));
    assert!(!text(&test_cold.stdout).contains("(cached)"));

    // Warm, with the go command's own cache emptied: everything from gocp.
    let warm_cache = tmp.path().join("gocache-warm");
    let warm = go(&module, &warm_cache, Some(&prog), &["build", "-x", "./..."]);
    let warm_err = text(&warm.stderr);
    assert!(warm.status.success(), "{warm_err}");
    let compiles = compile_steps(&warm_err);
    assert!(compiles.is_empty(), "warm build compiled:\n{}", compiles.join("\n"));
    let warm_stats = stats(&stats_file);
    assert!(warm_stats["hits"].as_u64().unwrap() > 0, "{warm_stats}");
    assert_eq!(warm_stats["plugin_errors"].as_u64(), Some(0), "{warm_stats}");

    let test_warm = go(&module, &tmp.path().join("gocache-warm2"), Some(&prog), &["test", "./..."]);
    let out = text(&test_warm.stdout);
    assert!(test_warm.status.success(), "{out}");
    let results: Vec<&str> = out.lines().filter(|l| l.starts_with("ok")).collect();
    assert_eq!(results.len(), 3, "{out}");
    assert!(results.iter().all(|l| l.contains("(cached)")), "not cached:\n{out}");

    // The command built from cached archives links and runs.
    let run = go(&module, &tmp.path().join("gocache-warm3"), Some(&prog), &["run", "./cmd/tool"]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    assert_eq!(text(&run.stdout).trim(), "{\"alpha\":0,\"beta\":1,\"gamma\":2} 3");
    // Quiet: nothing of gocp's own reached the build output.
    assert!(!text(&warm.stderr).contains("gocp:"), "{}", text(&warm.stderr));
}

#[test]
fn go_list_export_gets_disk_paths_that_outlive_the_go_command() {
    require_go();
    let tmp = tempfile::tempdir().unwrap();
    let module = tmp.path().join("module");
    write_module(&module);
    let state = tmp.path().join("state");
    let prog = gocacheprog(&state, &tmp.path().join("stats.json"), "");
    // go list never sends close: gocp-host must end cleanly at end of input,
    // and the files it names must stay (gopls and linters open them later).
    let out = go(&module, &tmp.path().join("gocache"), Some(&prog), &["list", "-export", "-f", "{{.Export}}", "./..."]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let paths: Vec<String> = text(&out.stdout).lines().filter(|l| !l.is_empty()).map(String::from).collect();
    assert_eq!(paths.len(), 4, "{paths:?}");
    for p in &paths {
        assert!(p.starts_with(state.to_str().unwrap()), "export data served from gocp's store: {p}");
        assert!(Path::new(p).extension().is_none(), "{p}");
        assert!(fs::metadata(p).unwrap().len() > 0);
    }
}

#[test]
fn memory_plugin_builds_and_tests_within_one_go_command() {
    require_go();
    let tmp = tempfile::tempdir().unwrap();
    let module = tmp.path().join("module");
    write_module(&module);
    let stats_file = tmp.path().join("stats.json");
    let prog = gocacheprog(&tmp.path().join("state"), &stats_file, "--plugin memory");
    let out = go(&module, &tmp.path().join("gocache"), Some(&prog), &["test", "./..."]);
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    assert_eq!(text(&out.stdout).lines().filter(|l| l.starts_with("ok")).count(), 3);
    let s = stats(&stats_file);
    assert_eq!(s["plugin"].as_str().map(|p| p.starts_with("memory")), Some(true), "{s}");
    assert!(s["puts"].as_u64().unwrap() > 10, "{s}");
    assert_eq!(s["gets"].as_u64(), Some(s["hits"].as_u64().unwrap() + s["misses"].as_u64().unwrap()), "{s}");
    assert_eq!(s["plugin_errors"].as_u64(), Some(0), "{s}");
}

#[test]
fn concurrent_go_commands_share_one_state_directory() {
    require_go();
    let tmp = tempfile::tempdir().unwrap();
    let module = tmp.path().join("module");
    write_module(&module);
    let state = tmp.path().join("state");
    // Three go commands at once (a CI runner, an editor, a linter), each with
    // its own GOCACHE, all through one gocp state directory.
    let handles: Vec<_> = (0..3)
        .map(|i| {
            let module = module.clone();
            let cache = tmp.path().join(format!("gocache-{i}"));
            let prog = gocacheprog(&state, &tmp.path().join(format!("stats-{i}.json")), "");
            let args: &'static [&'static str] = if i == 1 { &["test", "./..."] } else { &["build", "./..."] };
            std::thread::spawn(move || go(&module, &cache, Some(&prog), args))
        })
        .collect();
    for h in handles {
        let out = h.join().unwrap();
        assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    }
    let prog = gocacheprog(&state, &tmp.path().join("stats.json"), "");
    let warm = go(&module, &tmp.path().join("gocache-warm"), Some(&prog), &["build", "-x", "./..."]);
    assert!(warm.status.success(), "{}", text(&warm.stderr));
    assert!(compile_steps(&text(&warm.stderr)).is_empty(), "after concurrent builds, a warm build compiles nothing");
    let run = go(&module, &tmp.path().join("gocache-run"), Some(&prog), &["run", "./cmd/tool"]);
    assert_eq!(text(&run.stdout).trim(), "{\"alpha\":0,\"beta\":1,\"gamma\":2} 3", "{}", text(&run.stderr));
}
