//! An untrusted plugin can neither break the build nor reach what it was not
//! granted. Each test runs a real go build through a deliberately hostile
//! plugin (tests/plugins/hostile) and checks what the user would see: the
//! build succeeds, and the outcome shows in --stats-json and the plugin's own
//! report of what it managed to reach.

mod support;

use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::dns::SilentResolver;
use support::*;

/// A module of two packages without imports: builds in a second, so the
/// time goes into the plugin's behaviour, not into compiling the runtime.
fn tiny_module(dir: &Path) {
    let files = [
        ("go.mod", "module example.com/tiny\n\ngo 1.22\n"),
        ("a/a.go", "package a\n\nimport \"example.com/tiny/b\"\n\nfunc A() int { return b.B() + 1 }\n"),
        ("b/b.go", "package b\n\nfunc B() int { return 41 }\n"),
    ];
    for (name, body) in files {
        let path = dir.join(name);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, body).unwrap();
    }
}

struct Run {
    stats: Value,
    report: String,
    stderr: String,
}

/// Builds the tiny module through the hostile plugin doing `attack`.
fn build_through(attack: &str, extra: &[&str], env: &[(&str, &str)]) -> Run {
    build_prepared(attack, extra, env, |_| {})
}

/// Like `build_through`, letting `prepare` set up the state directory first.
fn build_prepared(attack: &str, extra: &[&str], env: &[(&str, &str)], prepare: impl FnOnce(&Path)) -> Run {
    let tmp = tempfile::tempdir().unwrap();
    let module = tmp.path().join("module");
    tiny_module(&module);
    let state = tmp.path().join("state");
    prepare(&state);
    let stats = tmp.path().join("stats.json");
    let plugin = test_plugin("hostile");
    let mut prog = format!(
        "{BIN} --dir {} --stats-json {} --plugin {} --plugin-timeout 300ms --config attack={attack}",
        state.display(),
        stats.display(),
        plugin.display()
    );
    for e in extra {
        prog.push(' ');
        prog.push_str(e);
    }
    let mut cmd = go_command(&module, &tmp.path().join("gocache"), Some(&prog), &["build", "./..."]);
    cmd.env_remove("GOCP_TEST_SECRET");
    for (k, v) in env {
        cmd.env(k, v);
    }
    // A build that takes this long has hung on the plugin: fails here.
    let out = cmd.output_within(Duration::from_secs(120));
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "the build must succeed despite attack={attack}:\n{stderr}");
    let report = fs::read_to_string(state.join("plugins/hostile/report")).unwrap_or_default();
    let stats = serde_json::from_slice(&fs::read(&stats).expect("stats written")).unwrap();
    Run { stats, report, stderr }
}

fn count(stats: &Value, key: &str) -> u64 {
    stats[key].as_u64().unwrap_or_else(|| panic!("no {key} in {stats}"))
}

#[test]
fn files_outside_the_grants_are_out_of_reach() {
    require_go();
    let granted = tempfile::tempdir().unwrap();
    fs::write(granted.path().join("hello.txt"), "hi").unwrap();
    let grant = format!("--allow-dir {}:/granted:ro", granted.path().display());
    let run = build_prepared("files", &[&grant], &[], |state| {
        // A symlink planted in the plugin's own directory, pointing out of it.
        let plugin_dir = state.join("plugins/hostile");
        fs::create_dir_all(&plugin_dir).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", plugin_dir.join("planted")).unwrap();
    });
    for what in ["etc-passwd", "dotdot", "own-symlink", "planted-symlink"] {
        let line = run
            .report
            .lines()
            .find(|l| l.starts_with(&format!("{what}:")))
            .unwrap_or_else(|| panic!("{what} not tried:\n{}", run.report));
        assert!(line.contains(": denied"), "{line}");
    }
    assert!(run.report.contains("granted-dir: ALLOWED"), "the granted directory is readable:\n{}", run.report);
    // The granted directory was read-only.
    assert_eq!(fs::read_dir(granted.path()).unwrap().count(), 1);
}

/// Serves `HTTP/1.1 200` to whoever connects, for a bounded time.
fn local_http_server() -> (u16, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    let handle = std::thread::spawn(move || {
        let until = Instant::now() + Duration::from_secs(90);
        while Instant::now() < until {
            match listener.accept() {
                Ok((mut c, _)) => {
                    c.set_nonblocking(false).unwrap();
                    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    let mut buf = [0u8; 4096];
                    let _ = c.read(&mut buf);
                    let _ = c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    });
    (port, handle)
}

#[test]
fn network_is_refused_unless_granted() {
    require_go();
    let (port, _server) = local_http_server();
    let port_cfg = format!("--config port={port}");
    let denied = build_through("net", &[&port_cfg], &[]);
    assert!(denied.report.contains("tcp: denied"), "{}", denied.report);
    assert!(denied.report.contains("http: denied (ErrorCode::HttpRequestDenied)"), "{}", denied.report);
    assert!(!denied.report.contains("ALLOWED"), "{}", denied.report);
    // One TCP connect and one HTTP request per instance, each refused and counted.
    assert!(count(&denied.stats, "network_denials") >= 2, "{}", denied.stats);

    // Another port on the same host is still refused...
    let other = format!("--allow-net 127.0.0.1:{}", port.wrapping_add(1).max(1));
    let wrong_port = build_through("net", &[&port_cfg, &other], &[]);
    assert!(!wrong_port.report.contains("ALLOWED"), "{}", wrong_port.report);

    // ...and the granted one is reachable, over TCP and HTTP.
    let grant = format!("--allow-net 127.0.0.1:{port}");
    let allowed = build_through("net", &[&port_cfg, &grant], &[]);
    assert!(allowed.report.contains("tcp: ALLOWED"), "{}", allowed.report);
    assert!(allowed.report.contains("http: ALLOWED HTTP status 200"), "{}", allowed.report);
    assert_eq!(count(&allowed.stats, "network_denials"), 0, "{}", allowed.stats);
}

#[test]
fn environment_variables_are_hidden_unless_granted() {
    require_go();
    let secret = [("GOCP_TEST_SECRET", "hunter2")];
    let hidden = build_through("env", &[], &secret);
    assert!(hidden.report.starts_with("env: denied"), "{}", hidden.report);
    let shown = build_through("env", &["--allow-env GOCP_TEST_SECRET"], &secret);
    assert!(shown.report.contains("env: ALLOWED GOCP_TEST_SECRET=hunter2"), "{}", shown.report);
}

#[test]
fn a_plugin_writing_to_stdout_cannot_disturb_the_protocol() {
    require_go();
    let run = build_through("stdout", &[], &[]);
    assert!(count(&run.stats, "gets") > 0, "{}", run.stats);
    assert_eq!(count(&run.stats, "gets"), count(&run.stats, "misses"));
    assert!(count(&run.stats, "puts") > 0);
}

#[test]
fn runaway_calls_become_misses_and_the_plugin_is_replaced() {
    require_go();
    for (attack, counter) in
        [("loop", "plugin_timeouts"), ("alloc", "plugin_traps"), ("panic", "plugin_traps"), ("sleep", "plugin_stuck")]
    {
        // Two instances, so that the later calls land on a replaced one (the
        // hostile plugin imports the network and would get sixteen).
        let run = build_through(attack, &["--plugin-memory 64MiB", "--instances 2"], &[]);
        let s = &run.stats;
        assert!(count(s, counter) > 0, "attack={attack}: {s}");
        assert_eq!(count(s, "hits"), 0, "attack={attack}: {s}");
        assert_eq!(count(s, "gets"), count(s, "misses"), "every get answered, as a miss: {s}");
        assert!(count(s, "puts") > 0, "puts still stored locally: {s}");
        if attack != "sleep" {
            // The trapped instance was thrown away and a fresh one served the
            // later calls (a stuck call's thread is replaced instead: plugin_stuck).
            assert!(count(s, "plugin_restarts") >= 1, "attack={attack}: {s}");
        }
        let gocp_lines: Vec<&str> = run.stderr.lines().filter(|l| l.starts_with("gocp:")).collect();
        assert_eq!(gocp_lines.len(), 1, "one line on stderr for attack={attack}: {gocp_lines:?}");
    }
}

#[test]
fn a_failing_backend_is_paused_instead_of_paid_for_on_every_request() {
    // A plugin that times out on every call, or says the backend is down:
    // without the breaker, 60 gets would cost 60 failures each.
    for (attack, counter) in [("loop", "plugin_timeouts"), ("unavailable", "plugin_errors")] {
        let tmp = tempfile::tempdir().unwrap();
        let stats = tmp.path().join("stats.json");
        let mut s = hostile_session(tmp.path(), &stats, attack, &["--plugin-timeout", "200ms", "--instances", "1"]);
        for id in 1..=60 {
            s.send_get(id, &sha256(&id.to_le_bytes()));
        }
        for _ in 0..60 {
            assert_eq!(s.recv()["Miss"], json!(true));
        }
        s.send_close(61);
        s.recv();
        let (status, _, stderr) = s.finish();
        assert!(status.success(), "{stderr}");
        let st = stats_of(&stats);
        assert!(count(&st, "breaker_trips") >= 1, "attack={attack}: {st}");
        assert!(count(&st, "skipped_while_paused") > 0, "attack={attack}: {st}");
        assert!(count(&st, counter) < 30, "attack={attack}: {st}");
        assert_eq!(stderr.lines().count(), 1, "attack={attack}: {stderr}");
    }
}

#[test]
fn bytes_that_do_not_match_their_output_id_are_never_served() {
    require_go();
    let run = build_through("wrong-bytes", &[], &[]);
    assert!(count(&run.stats, "rejected_bodies") > 0, "{}", run.stats);
    assert_eq!(count(&run.stats, "hits"), 0, "{}", run.stats);
    assert!(run.stderr.contains("rejected a body"), "{}", run.stderr);
}

#[test]
fn an_unwritable_state_directory_runs_the_build_uncached() {
    require_go();
    let tmp = tempfile::tempdir().unwrap();
    let module = tmp.path().join("module");
    tiny_module(&module);
    let blocker = tmp.path().join("not-a-dir");
    fs::write(&blocker, "a file where the state directory should be").unwrap();
    let prog = format!("{BIN} --dir {}", blocker.join("state").display());
    let out = go(&module, &tmp.path().join("gocache"), Some(&prog), &["build", "./..."]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("gocp:")).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].contains("cannot be written") && lines[0].contains("uncached"), "{stderr}");
}

/// Mounts a small tmpfs for the state directory: a disk that fills up.
struct SmallDisk {
    path: PathBuf,
}

impl SmallDisk {
    fn mount(path: &Path, size: &str) -> Option<SmallDisk> {
        fs::create_dir_all(path).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs", path.to_str().unwrap()])
            .output_within(COMMAND_LIMIT)
            .status
            .success();
        ok.then(|| SmallDisk { path: path.to_path_buf() })
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        std::process::Command::new("umount").arg(&self.path).output_within(COMMAND_LIMIT);
    }
}

#[test]
fn a_full_disk_costs_cache_entries_not_the_build() {
    require_go();
    let tmp = tempfile::tempdir().unwrap();
    let Some(disk) = SmallDisk::mount(&tmp.path().join("small"), "3m") else {
        // Mounting needs root, which CI and this project's machines have.
        panic!("cannot mount a tmpfs here (run the tests as root)");
    };
    let module = tmp.path().join("module");
    write_module(&module);
    let stats = tmp.path().join("stats.json");
    let prog = format!("{BIN} --dir {} --stats-json {}", disk.path.join("state").display(), stats.display());
    let out = go(&module, &tmp.path().join("gocache"), Some(&prog), &["build", "./..."]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // One line for the local store, and one for the plugin, whose own
    // directory is on the same full disk: not one per put.
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("gocp:")).collect();
    assert!((1..=2).contains(&lines.len()), "{stderr}");
    assert!(lines.iter().any(|l| l.contains("local store") && l.contains("No space left")), "{stderr}");
    let st: Value = serde_json::from_slice(&fs::read(&stats).unwrap()).unwrap();
    assert!(count(&st, "put_failures") > 0, "{st}");
    assert!(count(&st, "puts") > count(&st, "put_failures"), "what fitted was stored: {st}");
}

#[test]
fn plugin_stderr_is_shown_only_with_verbose_and_prefixed() {
    let plugin = test_plugin("hostile");
    let tmp = tempfile::tempdir().unwrap();
    let (d, p) = (tmp.path().to_str().unwrap(), plugin.to_str().unwrap());
    for verbose in [false, true] {
        let mut args = vec!["--dir", d, "--plugin", p, "--config", "attack=stdout"];
        if verbose {
            args.push("--verbose");
        }
        let (mut s, _) = Session::start(&args);
        s.send_get(1, &sha256(b"x"));
        assert_eq!(s.recv()["Miss"], json!(true));
        let (status, rest, stderr) = s.finish();
        assert!(status.success());
        assert!(rest.is_empty(), "the plugin's stdout must not appear: {rest:?}");
        let plugin_lines: Vec<&str> = stderr.lines().filter(|l| l.contains("hostile says hello")).collect();
        if verbose {
            assert_eq!(plugin_lines, ["gocp plugin hostile: hostile says hello on stderr"], "{stderr}");
        } else {
            assert!(plugin_lines.is_empty(), "{stderr}");
            assert_eq!(stderr, "", "quiet by default");
        }
    }
}

#[test]
fn help_plugin_lists_configuration_imports_and_the_grants_they_need() {
    let tmp = tempfile::tempdir().unwrap();
    let out = run_host(&["--dir", tmp.path().to_str().unwrap(), "--plugin", "disk", "--help-plugin"]);
    let help = text(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(help.starts_with("disk 0.1.0: "), "{help}");
    for key in ["path", "bodies", "max-age", "max-size", "trim-interval"] {
        assert!(help.lines().any(|l| l.trim_start().starts_with(key)), "config key {key} missing:\n{help}");
    }
    assert!(help.contains("wasi:filesystem/types@") && help.contains("--allow-dir"), "{help}");
    let hostile = test_plugin("hostile");
    let out =
        run_host(&["--dir", tmp.path().to_str().unwrap(), "--plugin", hostile.to_str().unwrap(), "--help-plugin"]);
    let help = text(&out.stdout);
    for (import, grant) in [
        ("wasi:http/outgoing-handler@", "--allow-net"),
        ("wasi:sockets/tcp@", "--allow-net"),
        ("wasi:cli/environment@", "--allow-env"),
    ] {
        let line = help.lines().find(|l| l.contains(import)).unwrap_or_else(|| panic!("{import} missing:\n{help}"));
        assert!(line.contains(grant), "{line}");
    }
}

/// Stats written by a session that has ended.
fn stats_of(path: &Path) -> Value {
    serde_json::from_slice(&fs::read(path).expect("stats written")).unwrap()
}

/// Starts gocp-host on the hostile plugin doing `attack`, with `extra` flags,
/// writing its statistics to `stats`.
fn hostile_session(state: &Path, stats: &Path, attack: &str, extra: &[&str]) -> Session {
    let plugin = test_plugin("hostile");
    let attack = format!("attack={attack}");
    let mut args = vec![
        "--dir",
        state.to_str().unwrap(),
        "--stats-json",
        stats.to_str().unwrap(),
        "--plugin",
        plugin.to_str().unwrap(),
        "--config",
        &attack,
    ];
    args.extend(extra);
    Session::start(&args).0
}

#[test]
fn a_backend_whose_bodies_stall_is_paused_too() {
    // Entries answer, every body sends 1 KiB, stalls and fails: each get is
    // one failure, so the breaker opens as it does for a backend that is down.
    let tmp = tempfile::tempdir().unwrap();
    let stats = tmp.path().join("stats.json");
    let mut s = hostile_session(tmp.path(), &stats, "stall-body", &["--instances", "1"]);
    for id in 1..=20 {
        s.send_get(id, &sha256(&id.to_le_bytes()));
        assert_eq!(s.recv()["Miss"], json!(true));
    }
    s.send_close(21);
    s.recv();
    let (status, _, stderr) = s.finish();
    assert!(status.success(), "{stderr}");
    let st = stats_of(&stats);
    assert!(count(&st, "breaker_trips") >= 1, "{st}");
    assert!(count(&st, "skipped_while_paused") > 0, "{st}");
    assert!(count(&st, "plugin_errors") < 20, "not every get paid for the stall: {st}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

#[test]
fn a_claimed_body_size_buys_no_time() {
    // The entry claims 400 MiB; 1 KiB arrives, then nothing. Only the bytes
    // that move earn time beyond --plugin-timeout.
    let tmp = tempfile::tempdir().unwrap();
    let stats = tmp.path().join("stats.json");
    let mut s = hostile_session(tmp.path(), &stats, "big-claim", &["--plugin-timeout", "300ms", "--instances", "1"]);
    let started = Instant::now();
    s.send_get(1, &sha256(b"a"));
    assert_eq!(s.recv()["Miss"], json!(true));
    let took = started.elapsed();
    s.send_close(2);
    s.recv();
    let (status, _, stderr) = s.finish();
    assert!(status.success(), "{stderr}");
    // The deadline (0.3 s) and the watchdog's grace and period (1-1.25 s);
    // a deadline set by the claim would be 50 s.
    assert!(took < Duration::from_secs(10), "a stalled 400 MiB claim held the get for {took:?}");
    assert_eq!(count(&stats_of(&stats), "plugin_stuck"), 1);
}

#[test]
fn a_plugin_that_cannot_start_costs_the_cache_not_the_build() {
    require_go();
    for attack in ["open-unavailable", "open-panic", "open-loop", "open-sleep"] {
        let run = build_through(attack, &["--instances 2"], &[]);
        let s = &run.stats;
        assert_eq!(count(s, "gets"), count(s, "misses"), "attack={attack}: {s}");
        assert!(count(s, "puts") > 0 && count(s, "put_failures") == 0, "kept locally: {s}");
        let lines: Vec<&str> = run.stderr.lines().filter(|l| l.starts_with("gocp:")).collect();
        assert_eq!(lines.len(), 1, "attack={attack}: {lines:?}");
        assert!(lines[0].contains("could not start"), "attack={attack}: {}", lines[0]);
    }
    // An instance replaced after a trap whose `open` then never returns:
    // watched like any call, so the build goes on.
    let run = build_through("later-opens-sleep", &["--instances 2"], &[]);
    assert!(count(&run.stats, "plugin_stuck") >= 1, "{}", run.stats);
    assert_eq!(count(&run.stats, "gets"), count(&run.stats, "misses"), "{}", run.stats);
}

#[test]
fn only_granted_names_are_ever_looked_up() {
    // With a grant for one peer, the plugin tries to resolve a name that
    // would carry a secret to whoever runs the DNS, and the granted one.
    let dns = SilentResolver::start();
    let tmp = tempfile::tempdir().unwrap();
    let plugin = test_plugin("hostile");
    let args = [
        "--dir",
        tmp.path().to_str().unwrap(),
        "--plugin",
        plugin.to_str().unwrap(),
        "--config",
        "attack=dns",
        "--allow-net",
        "127.0.0.1:9",
        "--allow-net",
        "localhost:9",
    ];
    let (s, _) = Session::start_command(dns.command(&BIN, &args));
    let (status, _, stderr) = s.finish();
    assert!(status.success(), "{stderr}");
    let report = fs::read_to_string(tmp.path().join("plugins/hostile/report")).unwrap();
    let line = |what: &str| report.lines().find(|l| l.starts_with(what)).unwrap_or_else(|| panic!("{what}?\n{report}"));
    assert!(line("dns-ungranted:").contains("denied") && line("dns-ungranted:").contains("access-denied"), "{report}");
    assert!(line("dns-granted:").contains("ALLOWED"), "{report}");
    let asked = dns.names();
    assert!(!asked.iter().any(|n| n.contains("hunter2")), "the name reached a resolver: {asked:?}");
}

#[test]
fn plugin_messages_reach_the_terminal_as_one_plain_line() {
    let tmp = tempfile::tempdir().unwrap();
    let stats = tmp.path().join("stats.json");
    let mut s = hostile_session(tmp.path(), &stats, "noisy-errors", &["--instances", "1"]);
    s.send_get(1, &sha256(b"a"));
    assert_eq!(s.recv()["Miss"], json!(true));
    let (status, _, stderr) = s.finish();
    assert!(status.success(), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{:?}", &stderr[..stderr.len().min(500)]);
    assert!(lines[0].starts_with("gocp: plugin hostile: "), "{}", lines[0]);
    assert!(!lines[0].chars().any(|c| c.is_control()), "escape sequences reached the terminal: {:?}", lines[0]);
    assert!(lines[0].len() < 1000, "{} bytes", lines[0].len());
}

#[test]
fn every_hostile_behaviour_is_exercised_by_a_test() {
    // The plugin lists its attacks in the help of its `attack` key.
    let tmp = tempfile::tempdir().unwrap();
    let hostile = test_plugin("hostile");
    let help = text(
        &run_host(&["--dir", tmp.path().to_str().unwrap(), "--plugin", hostile.to_str().unwrap(), "--help-plugin"])
            .stdout,
    );
    let listed = help.lines().find_map(|l| l.split_once("what to try: ")).map(|(_, names)| names).expect(&help);
    let names: Vec<&str> = listed.split(", ").collect();
    assert!(names.len() >= 15, "{names:?}");
    let tests = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests");
    let sources: String = ["sandbox.rs", "plugin_loading.rs", "sharing.rs"]
        .iter()
        .map(|f| fs::read_to_string(tests.join(f)).unwrap())
        .collect();
    for name in names {
        assert!(
            sources.contains(&format!("attack={name}\"")) || sources.contains(&format!("\"{name}\"")),
            "no test runs the hostile plugin's `{name}` behaviour"
        );
    }
}
