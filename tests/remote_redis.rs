//! The `redis` plugin against a real Redis server started on 127.0.0.1: the
//! scenarios every remote plugin must pass (tests/support/remote.rs), and what
//! is particular to this one: an ACL user confined to a prefix, upload dedup
//! seen from the server, a body larger than the plugin's memory streamed both
//! ways, `max-body`, `ttl`, a server restart under a running go command, a
//! hung server, configuration mistakes named at start, and a hand-made
//! manifest that tries to slip in a body that is not its output.

mod support;

use std::fs;

use serde_json::{Value, json};
use support::remote::{self, Backend, Machine, RemoteServer, gocp_lines};
use support::servers::redis::{ACL_PASSWORD, ACL_PREFIX, ACL_USER, PASSWORD, Redis};
use support::*;

/// The plugin's own unit tests (RESP framing, url and config parsing).
#[test]
fn plugin_unit_tests_pass() {
    plugin_crate_unit_tests("gocp-plugin-redis");
}

#[test]
fn two_machines_share_the_cache() {
    remote::shared_cache(&Redis::start());
}

#[test]
fn server_killed_mid_build() {
    remote::down_mid_build(&mut Redis::start());
}

#[test]
fn wrong_password_is_reported_once() {
    remote::bad_credentials(&Redis::start());
}

#[test]
fn conformance() {
    remote::conformance(&Redis::start());
}

/// A session with gocp-host on its own state directory, reaching `backend`.
fn session(state: &std::path::Path, backend: &Backend, extra: &[&str]) -> Session {
    let mut args: Vec<&str> = vec!["--dir", state.to_str().unwrap()];
    args.extend(backend.args.iter().map(String::as_str));
    args.extend(extra);
    let env: Vec<(&str, &str)> = backend.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Session::start_env(&args, &env).0
}

/// Stores `body` under `action` and waits until the plugin recorded it (close).
fn put(state: &std::path::Path, backend: &Backend, action: &[u8; 32], body: &[u8]) {
    let mut s = session(state, backend, &[]);
    s.send_put(1, action, body);
    assert!(s.recv().get("DiskPath").is_some(), "the put was answered with a path");
    s.send_close(2);
    s.recv();
    let (status, _, stderr) = s.finish();
    assert!(status.success() && gocp_lines(stderr.as_bytes()).is_empty(), "{stderr}");
}

/// Looks `action` up from a state directory that has never seen it.
fn get(state: &std::path::Path, backend: &Backend, action: &[u8; 32], extra: &[&str]) -> Value {
    let mut s = session(state, backend, extra);
    s.send_get(1, action);
    let r = s.recv();
    s.send_close(2);
    s.recv();
    let (status, _, stderr) = s.finish();
    assert!(status.success() && gocp_lines(stderr.as_bytes()).is_empty(), "{stderr}");
    r
}

#[test]
fn an_acl_user_works_within_its_prefix_and_is_refused_outside() {
    require_go();
    let server = Redis::start();
    let credentials = format!("{ACL_USER}:{ACL_PASSWORD}@");
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_module(&src);

    let confined = server.backend_with(&credentials, &[&format!("prefix={ACL_PREFIX}")]);
    let machine = Machine::new(&tmp.path().join("a"));
    let out = machine.run(&confined, &src, &["build", "./..."]);
    assert_eq!(gocp_lines(&out.stderr), Vec::<String>::new());
    assert!(!server.keys(&format!("{ACL_PREFIX}ac/*")).is_empty(), "entries under the prefix");
    assert!(!server.keys(&format!("{ACL_PREFIX}cas/*")).is_empty(), "bodies under the prefix");
    assert_eq!(server.keys("gocp/*"), Vec::<String>::new(), "nothing under the default prefix");

    // The same user on the default prefix: Redis says NOPERM; the build goes on.
    let outside = server.backend_with(&credentials, &[]);
    let machine = Machine::new(&tmp.path().join("b"));
    let out = machine.run(&outside, &src, &["build", "./..."]);
    let lines = gocp_lines(&out.stderr);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("credentials") && lines[0].contains("NOPERM"), "{}", lines[0]);
}

#[test]
fn a_body_already_on_the_server_is_not_uploaded_again() {
    let server = Redis::start();
    let backend = server.backend();
    let tmp = tempfile::tempdir().unwrap();
    // Noise: gocp stores what compresses well compressed, under another name.
    let body = noise_body(3, 300_000);
    put(&tmp.path().join("a"), &backend, &[1; 32], &body);
    assert_eq!(server.calls("set"), 2, "A stored a body and an entry");

    // Machine B produces the same output under another action: its host does
    // not know the server has it, so only the plugin can skip the upload.
    put(&tmp.path().join("b"), &backend, &[2; 32], &body);
    assert_eq!(server.calls("set"), 3, "B stored only its entry");
    assert_eq!(server.keys("gocp/cas/*").len(), 1);
    assert_eq!(server.keys("gocp/ac/*").len(), 2);

    let hit = get(&tmp.path().join("c"), &backend, &[2; 32], &[]);
    assert_eq!(fs::read(hit["DiskPath"].as_str().unwrap()).unwrap(), body, "{hit}");
}

#[test]
fn a_body_larger_than_the_plugins_memory_streams_both_ways() {
    let server = Redis::start();
    let backend = server.backend();
    let tmp = tempfile::tempdir().unwrap();
    let size: u64 = 96 << 20;
    let pattern = |chunk: &mut [u8]| chunk.iter_mut().enumerate().for_each(|(i, b)| *b = (i % 251) as u8);
    let mut whole = Vec::with_capacity(size as usize);
    let mut chunk = vec![0u8; 3 << 20];
    while (whole.len() as u64) < size {
        let n = (size as usize - whole.len()).min(chunk.len());
        pattern(&mut chunk[..n]);
        whole.extend_from_slice(&chunk[..n]);
    }
    let output = sha256(&whole);
    drop(whole);

    // 32 MiB per instance: a plugin holding the body in memory would trap.
    // Uncompressed, so that the plugin streams the body as the go command wrote it.
    let small = ["--plugin-memory", "32MiB", "--compress", "none"];
    let mut s = session(&tmp.path().join("a"), &backend, &small);
    s.send_put_streamed(1, &[9; 32], &output, size, pattern);
    assert!(s.recv().get("DiskPath").is_some());
    s.send_close(2);
    s.recv();
    let (status, _, stderr) = s.finish();
    assert!(status.success() && gocp_lines(stderr.as_bytes()).is_empty(), "{stderr}");
    assert_eq!(server.cli(&["STRLEN", &format!("gocp/cas/{}", hex::encode(output))]), size.to_string());

    let hit = get(&tmp.path().join("b"), &backend, &[9; 32], &small);
    assert_eq!(hit["Size"], json!(size), "{hit}");
    let served = fs::read(hit["DiskPath"].as_str().unwrap()).unwrap();
    assert_eq!(sha256(&served), output, "the body came back whole");
}

#[test]
fn bodies_beyond_max_body_stay_local() {
    let server = Redis::start();
    let mut backend = server.backend();
    // The plugin's own limit, on bodies as they are (compressed, these would fit).
    backend.args.extend(["--config".into(), "max-body=64KiB".into(), "--compress".into(), "none".into()]);
    let tmp = tempfile::tempdir().unwrap();
    put(&tmp.path().join("a"), &backend, &[1; 32], &vec![1u8; 100_000]);
    put(&tmp.path().join("a"), &backend, &[2; 32], &vec![2u8; 1000]);
    assert_eq!(server.keys("gocp/cas/*"), vec![format!("gocp/cas/{}", hex::encode(sha256(&[2u8; 1000])))]);
    assert_eq!(server.keys("gocp/ac/*").len(), 2, "both entries are shared");
    assert_eq!(get(&tmp.path().join("a"), &backend, &[1; 32], &[])["Size"], json!(100_000), "A still has it");
    assert_eq!(get(&tmp.path().join("b"), &backend, &[1; 32], &[])["Miss"], json!(true), "B cannot get it");
}

/// Most of a Go build's outputs are a few hundred bytes: each travels inside
/// its entry, one key and one request instead of two, and comes back whole.
#[test]
fn a_small_output_travels_inside_its_entry() {
    let server = Redis::start();
    let backend = server.backend();
    let tmp = tempfile::tempdir().unwrap();
    let body = b"a small output".to_vec();
    put(&tmp.path().join("a"), &backend, &[3; 32], &body);
    let keys = server.cli(&["KEYS", "gocp/*"]);
    assert_eq!(keys.trim(), format!("gocp/ac/{}", hex::encode([3u8; 32])), "the entry alone");
    let hit = get(&tmp.path().join("b"), &backend, &[3; 32], &[]);
    assert_eq!(fs::read(hit["DiskPath"].as_str().unwrap()).unwrap(), body);
}

#[test]
fn ttl_expires_entries_and_bodies_and_hits_refresh_them() {
    let server = Redis::start();
    let mut backend = server.backend();
    backend.args.extend(["--config".into(), "ttl=1h".into()]);
    let tmp = tempfile::tempdir().unwrap();
    // Too large to travel inside its entry, and not compressible: a body of its own.
    let body: Vec<u8> = (0..64u8).flat_map(|i| sha256(&[i])).collect();
    put(&tmp.path().join("a"), &backend, &[1; 32], &body);
    let entry = format!("gocp/ac/{}", hex::encode([1u8; 32]));
    let cas = format!("gocp/cas/{}", hex::encode(sha256(&body)));
    for key in [&entry, &cas] {
        let ttl: u64 = server.cli(&["TTL", key]).parse().unwrap();
        assert!((3590..=3600).contains(&ttl), "{key} expires in an hour: {ttl}");
        server.cli(&["EXPIRE", key, "60"]);
    }
    let hit = get(&tmp.path().join("b"), &backend, &[1; 32], &[]);
    assert_eq!(fs::read(hit["DiskPath"].as_str().unwrap()).unwrap(), body);
    for key in [&entry, &cas] {
        let ttl: u64 = server.cli(&["TTL", key]).parse().unwrap();
        assert!(ttl > 3500, "a hit gave {key} another hour: {ttl}");
    }
}

#[test]
fn a_restarted_server_is_reconnected_without_an_error() {
    let mut server = Redis::start();
    let backend = server.backend();
    let tmp = tempfile::tempdir().unwrap();
    let stats = tmp.path().join("stats.json");
    // One instance, so the call after the restart meets the broken connection.
    let mut s =
        session(&tmp.path().join("a"), &backend, &["--instances", "1", "--stats-json", stats.to_str().unwrap()]);
    s.send_get(1, &[1; 32]);
    assert_eq!(s.recv()["Miss"], json!(true));
    server.restart();
    s.send_put(2, &[2; 32], b"after the restart");
    assert!(s.recv().get("DiskPath").is_some());
    s.send_close(3);
    s.recv();
    let (status, _, stderr) = s.finish();
    assert!(status.success() && gocp_lines(stderr.as_bytes()).is_empty(), "{stderr}");
    let stats: Value = serde_json::from_slice(&fs::read(&stats).unwrap()).unwrap();
    assert_eq!(stats["plugin_errors"], json!(0), "{stats}");
    assert_eq!(server.keys("gocp/ac/*"), vec![format!("gocp/ac/{}", hex::encode([2u8; 32]))]);
}

#[test]
fn a_hung_server_costs_a_build_seconds_and_one_line() {
    let server = Redis::start();
    let mut backend = server.backend();
    backend.args.extend(["--config".into(), "timeout=1s".into()]);
    // Stopped, the server still accepts connections (the kernel does) but never answers.
    remote::hung_server(
        &backend,
        || server.process.signal("-STOP"),
        || server.process.signal("-CONT"),
        "no answer within 1s",
    );
}

fn fails_to_start(args: &[&str], env: &[(&str, &str)]) -> String {
    remote::fails_to_start("redis", args, env)
}

#[test]
fn configuration_mistakes_are_named_before_anything_is_served() {
    let e = fails_to_start(&[], &[]);
    assert!(e.contains("url is required"), "{e}");
    let e = fails_to_start(&["--config", "url=rediss://127.0.0.1:1"], &[]);
    assert!(e.contains("TLS"), "{e}");
    let e = fails_to_start(&["--config", "url=redis://:hunter2@127.0.0.1:1/x"], &[]);
    assert!(e.contains("database") && !e.contains("hunter2"), "the password is never echoed: {e}");
    // A variable that is set but not granted is absent inside the plugin.
    let e = fails_to_start(&["--config", "url=redis://127.0.0.1:1", "--config", "password-env=P"], &[("P", "pw")]);
    assert!(e.contains("set P and grant it with --allow-env P"), "{e}");
    let e = fails_to_start(&["--config", "url=redis://127.0.0.1:1", "--config", "ttl=soon"], &[]);
    assert!(e.contains("ttl=soon"), "{e}");
    // Nothing listens on port 1: start-up never contacts the server.
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = Session::start(&[
        "--dir",
        dir.path().to_str().unwrap(),
        "--plugin",
        "redis",
        "--config",
        "url=redis://127.0.0.1:1",
        "--allow-net",
        "127.0.0.1:1",
    ]);
    let (status, _, stderr) = s.finish();
    assert!(status.success() && gocp_lines(stderr.as_bytes()).is_empty(), "{stderr}");
}

/// Sets `key` to a binary `value` (redis-cli takes only text arguments).
fn set_binary(server: &Redis, key: &str, value: &[u8]) {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    let mut command = format!("*2\r\n$4\r\nAUTH\r\n${}\r\n{PASSWORD}\r\n", PASSWORD.len()).into_bytes();
    command.extend(format!("*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n${}\r\n", key.len(), value.len()).bytes());
    command.extend_from_slice(value);
    command.extend_from_slice(b"\r\n");
    conn.write_all(&command).unwrap();
    let mut replies = [0u8; 10];
    conn.read_exact(&mut replies).unwrap();
    assert_eq!(&replies, b"+OK\r\n+OK\r\n");
}

/// A manifest is only a list of claims: a body carried in it that does not
/// hash to its output id is rejected like any other, and the go command gets
/// the real output from the server. The manifest here is written by hand, as
/// a compromised or buggy writer could, under the pointer for the session's
/// first get.
#[test]
fn a_manifest_cannot_smuggle_in_a_wrong_body() {
    let server = Redis::start();
    let backend = server.backend();
    let tmp = tempfile::tempdir().unwrap();
    let action = [0x51u8; 32];
    put(&tmp.path().join("a"), &backend, &action, b"right");

    let output_id = sha256(b"right");
    let mut manifest = b"gocp manifest v1\n".to_vec();
    manifest.extend_from_slice(&action);
    manifest.extend_from_slice(&output_id);
    manifest.extend_from_slice(&5u64.to_le_bytes());
    manifest.extend_from_slice(&1u64.to_le_bytes());
    manifest.extend_from_slice(&5u32.to_le_bytes());
    manifest.extend_from_slice(b"wrong");
    let manifest_id = sha256(&manifest);
    set_binary(&server, &format!("gocp/cas/{}", hex::encode(manifest_id)), &manifest);
    let first_get = [0x42u8; 32];
    let pointer = gocp_host::manifest::pointer_key(&first_get);
    let line = format!("v1 {} {} 1", hex::encode(manifest_id), manifest.len());
    server.cli(&["SET", &format!("gocp/ac/{}", hex::encode(pointer)), &line]);

    let stats = tmp.path().join("stats.json");
    let mut s = session(&tmp.path().join("b"), &backend, &["--stats-json", stats.to_str().unwrap()]);
    s.send_get(1, &first_get);
    assert_eq!(s.recv()["Miss"], json!(true));
    // The manifest is read and its one item tried right after that answer.
    std::thread::sleep(std::time::Duration::from_secs(2));
    s.send_get(2, &action);
    let hit = s.recv();
    assert_eq!(fs::read(hit["DiskPath"].as_str().unwrap()).unwrap(), b"right");
    s.send_close(3);
    s.recv();
    let (status, _, stderr) = s.finish();
    assert!(status.success(), "{stderr}");
    let lines = gocp_lines(stderr.as_bytes());
    assert!(lines.len() == 1 && lines[0].contains("rejected a body carried in a manifest"), "{stderr}");
    let stats: Value = serde_json::from_slice(&fs::read(&stats).unwrap()).unwrap();
    assert_eq!(stats["manifest_items"], json!(1), "{stats}");
    assert_eq!(stats["rejected_bodies"], json!(1), "{stats}");
    assert_eq!(stats["prefetched"], json!(0), "{stats}");
    assert_eq!(stats["hits_fetched"], json!(1), "the real body came from the server: {stats}");
}

#[test]
fn stalled_bodies_pause_the_plugin() {
    remote::stalled_bodies(&Redis::start());
}

#[test]
fn read_only_builds_write_nothing_and_read_what_trusted_builds_signed() {
    remote::read_only_and_signed(&Redis::start());
}
