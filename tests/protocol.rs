//! gocp-host driven over stdin/stdout exactly as cmd/go drives it.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Value, json};
use support::*;

fn state_args(dir: &std::path::Path) -> Vec<String> {
    vec!["--dir".into(), dir.to_str().unwrap().into()]
}

fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn action(n: u32) -> [u8; 32] {
    sha256(format!("action {n}").as_bytes())
}

fn body(n: u32) -> Vec<u8> {
    // Sizes from 0 to a few hundred KiB, content unique per n.
    let len = (n as usize * 7919) % 300_000;
    (0..len).map(|i| (i as u32 ^ n.wrapping_mul(2654435761)) as u8).collect()
}

/// Checks a hit the way cmd/go uses it: size, output id, and the file's bytes.
fn assert_hit(resp: &Value, expected_body: &[u8]) {
    assert_eq!(resp.get("Miss"), None, "{resp}");
    assert_eq!(resp.get("Err"), None, "{resp}");
    assert_eq!(resp.get("Size").and_then(Value::as_u64).unwrap_or(0), expected_body.len() as u64, "{resp}");
    assert_eq!(unb64(resp["OutputID"].as_str().unwrap()), sha256(expected_body));
    let path = resp["DiskPath"].as_str().unwrap();
    assert!(std::path::Path::new(path).extension().is_none(), "DiskPath has an extension: {path}");
    assert_eq!(sha256(&fs::read(path).unwrap()), sha256(expected_body), "file at DiskPath has other bytes");
    let time = resp["Time"].as_str().expect("a hit carries Time");
    let t = humantime::parse_rfc3339(time).expect("Time is RFC 3339");
    let age = SystemTime::now().duration_since(t).expect("Time is in the past");
    assert!(age < Duration::from_secs(600), "Time {time} is the put time, not something else");
}

#[test]
fn capabilities_come_first_and_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (session, caps) = Session::start(&args(&state_args(dir.path())));
    assert_eq!(caps, json!({"ID": 0, "KnownCommands": ["get", "put", "close"]}));
    let (status, rest, stderr) = session.finish();
    assert!(status.success());
    assert!(rest.is_empty());
    assert_eq!(stderr, "", "quiet by default");
}

#[test]
fn pipelined_requests_are_each_answered_once_then_served_from_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let a = state_args(dir.path());
    let (mut s, _) = Session::start(&args(&a));
    // Everything is written before anything is read, as cmd/go's workers do.
    let mut sent = BTreeSet::new();
    let mut id = 1;
    for n in 0..300u32 {
        s.send_put(id, &action(n), &body(n));
        sent.insert(id);
        id += 1;
        s.send_get(id, &action(n + 10_000));
        sent.insert(id);
        id += 1;
    }
    s.send_close(id);
    let close_id = id;
    let mut seen = BTreeMap::new();
    while seen.len() < sent.len() + 1 {
        let r = s.recv();
        let rid = r["ID"].as_i64().unwrap();
        assert!(rid == close_id || sent.contains(&rid), "response for an ID never sent: {r}");
        assert!(seen.insert(rid, r.clone()).is_none(), "ID {rid} answered twice");
    }
    let (status, rest, stderr) = s.finish();
    assert!(status.success(), "{stderr}");
    assert!(rest.is_empty(), "responses after close: {rest:?}");
    assert_eq!(seen[&close_id], json!({"ID": close_id}), "close is answered, never with Err");
    for (rid, r) in seen.iter().filter(|(rid, _)| **rid != close_id) {
        if rid % 2 == 1 {
            let path = r["DiskPath"].as_str().unwrap_or_else(|| panic!("put without DiskPath: {r}"));
            assert!(fs::metadata(path).unwrap().is_file());
        } else {
            assert_eq!(r["Miss"], json!(true), "{r}");
        }
    }

    // A later go command finds every output again.
    let (mut s, _) = Session::start(&args(&a));
    for n in 0..300u32 {
        s.send_get(n as i64 + 1, &action(n));
    }
    let mut responses = BTreeMap::new();
    for _ in 0..300 {
        let r = s.recv();
        responses.insert(r["ID"].as_i64().unwrap(), r);
    }
    for n in 0..300u32 {
        assert_hit(&responses[&(n as i64 + 1)], &body(n));
    }
    assert!(s.finish().0.success());
}

#[test]
fn zero_size_bodies_are_stored_as_empty_files() {
    let dir = tempfile::tempdir().unwrap();
    let a = state_args(dir.path());
    let (mut s, _) = Session::start(&args(&a));
    s.send_put(1, &action(1), b"");
    let r = s.recv();
    assert_eq!(fs::metadata(r["DiskPath"].as_str().unwrap()).unwrap().len(), 0);
    s.send_close(2);
    s.recv();
    s.finish();
    let (mut s, _) = Session::start(&args(&a));
    s.send_get(1, &action(1));
    let r = s.recv();
    assert_hit(&r, b"");
    assert_eq!(r.get("Size"), None, "a zero size is left out, as cmd/go writes it");
    s.finish();
}

fn peak_rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn a_body_over_100_mb_streams_through_without_being_held_in_memory() {
    const SIZE: u64 = 150 << 20;
    let dir = tempfile::tempdir().unwrap();
    let a = state_args(dir.path());
    let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
    let mut state = 7u64;
    let mut left = SIZE;
    let mut chunk = vec![0u8; 3 << 20];
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        noise(&mut state, &mut chunk[..n]);
        sha2::Digest::update(&mut hasher, &chunk[..n]);
        left -= n as u64;
    }
    let output: [u8; 32] = sha2::Digest::finalize(hasher).into();

    let (mut s, _) = Session::start(&args(&a));
    let mut state = 7u64;
    s.send_put_streamed(1, &action(1), &output, SIZE, |buf| noise(&mut state, buf));
    let r = s.recv();
    let path = r["DiskPath"].as_str().unwrap_or_else(|| panic!("{r}")).to_string();
    let peak_mib = peak_rss_kib(s.pid()) / 1024;
    s.send_get(2, &action(1));
    let hit = s.recv();
    s.send_close(3);
    s.recv();
    let (status, _, stderr) = s.finish();
    assert!(status.success(), "{stderr}");
    assert_eq!(fs::metadata(&path).unwrap().len(), SIZE);
    assert_eq!(unb64(hit["OutputID"].as_str().unwrap()), output);
    assert_eq!(hit["Size"].as_u64(), Some(SIZE));
    let on_disk = {
        let mut h = <sha2::Sha256 as sha2::Digest>::new();
        std::io::copy(&mut fs::File::open(&path).unwrap(), &mut h).unwrap();
        <[u8; 32]>::from(sha2::Digest::finalize(h))
    };
    assert_eq!(on_disk, output);
    assert!(peak_mib < 100, "peak RSS {peak_mib} MiB while receiving a 150 MiB body");
}

#[test]
fn end_of_input_without_close_still_records_puts() {
    let dir = tempfile::tempdir().unwrap();
    let a = state_args(dir.path());
    let (mut s, _) = Session::start(&args(&a));
    s.send_put(1, &action(5), &body(5));
    s.recv();
    let (status, _, stderr) = s.finish();
    assert!(status.success(), "{stderr}");
    assert_eq!(stderr, "");
    let (mut s, _) = Session::start(&args(&a));
    s.send_get(1, &action(5));
    assert_hit(&s.recv(), &body(5));
    s.finish();
}

#[test]
fn bad_puts_get_errors_and_the_stream_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _) = Session::start(&args(&state_args(dir.path())));
    let a = b64(&action(1));
    let o = b64(&sha256(b"abc"));
    // Invalid base64, a size that does not match, and bytes that do not hash
    // to the OutputID: each refused, none given a DiskPath.
    s.send_raw(
        format!(
            "{{\"ID\":1,\"Command\":\"put\",\"ActionID\":\"{a}\",\"OutputID\":\"{o}\",\"BodySize\":3}}\n\n\"!!!!\"\n"
        )
        .as_bytes(),
    );
    s.send_raw(
        format!(
            "{{\"ID\":2,\"Command\":\"put\",\"ActionID\":\"{a}\",\"OutputID\":\"{o}\",\"BodySize\":4}}\n\n\"{}\"\n",
            b64(b"abc")
        )
        .as_bytes(),
    );
    s.send_raw(
        format!(
            "{{\"ID\":3,\"Command\":\"put\",\"ActionID\":\"{a}\",\"OutputID\":\"{o}\",\"BodySize\":3}}\n\n\"{}\"\n",
            b64(b"xyz")
        )
        .as_bytes(),
    );
    s.send_raw(b"{\"ID\":4,\"Command\":\"frobnicate\"}\n\n");
    s.send_get(5, &action(1));
    let mut by_id = BTreeMap::new();
    for _ in 0..5 {
        let r = s.recv();
        by_id.insert(r["ID"].as_i64().unwrap(), r);
    }
    for id in 1..=4 {
        assert!(by_id[&id]["Err"].is_string(), "{}", by_id[&id]);
        assert_eq!(by_id[&id].get("DiskPath"), None);
    }
    assert!(by_id[&3]["Err"].as_str().unwrap().contains("hashes to"), "{}", by_id[&3]);
    assert_eq!(by_id[&5]["Miss"], json!(true));
    s.send_close(6);
    assert_eq!(s.recv(), json!({"ID": 6}));
    assert!(s.finish().0.success());
}

#[test]
fn garbage_input_ends_with_one_clear_line_not_a_panic() {
    for garbage in [&b"hello there\n"[..], b"{\"ID\":1,\"Command\":\"get\",\"ActionID\":\"AAAA\"}\n", b"\xff\xfe\x00\n"]
    {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = Session::start(&args(&state_args(dir.path())));
        s.send_raw(garbage);
        let (status, rest, stderr) = s.finish();
        assert_eq!(status.code(), Some(1), "{stderr}");
        assert!(rest.is_empty());
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains("malformed request"), "{stderr}");
        assert!(!stderr.contains("panicked"));
    }
}

#[test]
fn truncated_body_leaves_no_file_and_exits() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _) = Session::start(&args(&state_args(dir.path())));
    let a = b64(&action(1));
    s.send_raw(
        format!(
            "{{\"ID\":1,\"Command\":\"put\",\"ActionID\":\"{a}\",\"OutputID\":\"{a}\",\"BodySize\":3000}}\n\n\"AAAA"
        )
        .as_bytes(),
    );
    let (status, rest, stderr) = s.finish();
    assert_eq!(status.code(), Some(1));
    assert!(rest.is_empty());
    assert!(stderr.contains("input ended inside the body"), "{stderr}");
    let objects: Vec<_> =
        files_under(&dir.path().join("objects")).into_iter().filter(|p| !p.ends_with("last-trim")).collect();
    assert!(objects.is_empty(), "left behind: {objects:?}");
}

#[test]
fn memory_plugin_hits_within_one_process_and_serves_bodies_it_holds() {
    let dir = tempfile::tempdir().unwrap();
    let stats = dir.path().join("stats.json");
    let log = dir.path().join("requests.jsonl");
    let mut a = state_args(dir.path());
    a.extend(
        ["--plugin", "memory", "--stats-json", stats.to_str().unwrap(), "--log-requests", log.to_str().unwrap()]
            .map(String::from),
    );
    let (mut s, _) = Session::start(&args(&a));
    let put = s.send_put(1, &action(1), &body(9));
    let r = s.recv();
    // The put is recorded by the plugin in the background, from the local
    // copy, once an instance has compiled it (0.2 s for the static musl build
    // on its own, more with other tests compiling beside it): wait for the
    // request log to say so, for up to 10 s.
    let until = Instant::now() + Duration::from_secs(10);
    let recorded = |text: String| {
        text.lines().any(|l| l.contains("\"command\":\"record\"") && l.contains("\"result\":\"stored\""))
    };
    while !recorded(fs::read_to_string(&log).unwrap_or_default()) {
        assert!(Instant::now() < until, "the put was not recorded within 10 s");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Take the local copy away: the body must come back from the plugin's memory.
    fs::remove_file(r["DiskPath"].as_str().unwrap()).unwrap();
    s.send_get(2, &action(1));
    let hit = s.recv();
    assert_hit(&hit, &body(9));
    assert_eq!(unb64(hit["OutputID"].as_str().unwrap()), put);
    s.send_close(3);
    s.recv();
    assert!(s.finish().0.success());
    let figures: Value = serde_json::from_slice(&fs::read(&stats).unwrap()).unwrap();
    assert_eq!(figures["hits_fetched"], json!(1), "{figures}");
    assert_eq!(figures["rejected_bodies"], json!(0), "{figures}");

    // A new process: the local tier in front of the plugin still has the
    // entry and the body (fetched back above), so it is a hit without the
    // plugin; without the local body it is a miss, since the memory plugin
    // lasts one go command.
    let (mut s, _) = Session::start(&args(&a));
    s.send_get(1, &action(1));
    let hit = s.recv();
    assert_hit(&hit, &body(9));
    fs::remove_file(hit["DiskPath"].as_str().unwrap()).unwrap();
    s.send_get(2, &action(1));
    assert_eq!(s.recv()["Miss"], json!(true));
    s.send_close(3);
    s.recv();
    assert!(s.finish().0.success());
    let figures: Value = serde_json::from_slice(&fs::read(&stats).unwrap()).unwrap();
    assert_eq!((&figures["hits_local"], &figures["misses"]), (&json!(1), &json!(1)), "{figures}");
}

#[test]
fn memory_plugin_evicts_the_least_recently_used_bodies() {
    let dir = tempfile::tempdir().unwrap();
    let stats = dir.path().join("stats.json");
    let mut a = state_args(dir.path());
    // Room for two 100 kB bodies, not three.
    a.extend(["--plugin", "memory", "--config", "max-bytes=250000", "--stats-json"].map(String::from));
    a.push(stats.to_str().unwrap().into());
    let (mut s, _) = Session::start(&args(&a));
    let bodies: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i; 100_000]).collect();
    let mut paths = Vec::new();
    for (i, b) in bodies.iter().enumerate() {
        s.send_put(i as i64 + 1, &action(i as u32), b);
        paths.push(s.recv()["DiskPath"].as_str().unwrap().to_string());
    }
    // The memory plugin runs one instance, on one thread, which records each
    // put before it reads the next request: once these gets are answered,
    // the three puts are recorded. Then take the local copies away.
    for i in 0..3u32 {
        s.send_get(100 + i as i64, &action(i));
        assert!(s.recv().get("Miss").is_none());
    }
    for p in &paths {
        fs::remove_file(p).unwrap();
    }
    let mut outcome = Vec::new();
    for i in 0..3u32 {
        s.send_get(200 + i as i64, &action(i));
        outcome.push(s.recv().get("Miss").is_none());
    }
    assert_eq!(outcome, [false, true, true], "the oldest body was evicted, the two newest kept");
    s.send_close(999);
    s.recv();
    assert!(s.finish().0.success());
}
