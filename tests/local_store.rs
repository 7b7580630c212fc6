//! The local store, whose files the go command reads: what trimming may
//! remove while go commands share it, how a damaged file is repaired, and
//! that every put of a session reaches the plugin.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use support::*;

const HOUR: Duration = Duration::from_secs(3600);

fn set_mtime(path: &Path, ago: Duration) {
    filetime::set_file_mtime(path, filetime::FileTime::from_system_time(SystemTime::now() - ago)).unwrap();
}

/// Puts `body` under action `[n; 32]` in a session of its own.
fn put_once(state: &Path, n: u8, body: &[u8]) -> PathBuf {
    let (mut s, _) = Session::start(&["--dir", state.to_str().unwrap()]);
    s.send_put(1, &[n; 32], body);
    let path = PathBuf::from(s.recv()["DiskPath"].as_str().expect("a DiskPath"));
    s.send_close(2);
    s.recv();
    let (status, _, stderr) = s.finish();
    assert!(status.success(), "{stderr}");
    // The first close starts a trim: done before the test goes on, or a trim
    // it asks for next would find this one running and be skipped.
    wait_for_trim(state);
    path
}

/// A session that closes at once with these trim settings: it trims.
fn trim_now(state: &Path, max_size: &str) {
    let (mut s, _) =
        Session::start(&["--dir", state.to_str().unwrap(), "--max-size", max_size, "--trim-interval", "0s"]);
    s.send_close(1);
    s.recv();
    let (status, _, stderr) = s.finish();
    assert!(status.success(), "{stderr}");
    wait_for_trim(state);
}

#[test]
fn a_trim_never_removes_what_a_running_go_command_was_given() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path();
    let unused = put_once(state, 1, &[1; 50_000]);
    set_mtime(&unused, HOUR * 20);

    // A long-running go command (here, a session kept open) that started
    // ten hours ago and was given two outputs then: their times say so (a
    // use refreshes a time at most hourly).
    let (mut running, _) = Session::start(&["--dir", state.to_str().unwrap(), "--trim-interval", "1000d"]);
    running.send_put(1, &[2; 32], &[2; 50_000]);
    let given_early = PathBuf::from(running.recv()["DiskPath"].as_str().unwrap());
    running.send_put(2, &[3; 32], &[3; 50_000]);
    let given_late = PathBuf::from(running.recv()["DiskPath"].as_str().unwrap());
    let slot = fs::read_dir(state.join("sessions")).unwrap().next().unwrap().unwrap().path();
    let ten_hours_ago = (SystemTime::now() - HOUR * 10).duration_since(UNIX_EPOCH).unwrap().as_nanos();
    fs::write(&slot, format!("{ten_hours_ago:020}\n")).unwrap();
    set_mtime(&given_early, HOUR * 10);

    // Another go command closes with a store far over its size: it trims.
    trim_now(state, "1KiB");
    assert!(!unused.exists(), "what nobody used for 20 hours goes");
    assert!(given_early.exists() && given_late.exists(), "what the running go command was given stays");
    running.send_get(3, &[2; 32]);
    assert_eq!(running.recv()["DiskPath"].as_str(), given_early.to_str(), "and is still served");

    running.send_close(4);
    running.recv();
    let (status, _, stderr) = running.finish();
    assert!(status.success(), "{stderr}");
    // Once it has ended, only the recent-use window protects them.
    set_mtime(&given_early, HOUR * 10);
    trim_now(state, "1KiB");
    assert!(!given_early.exists(), "unused for 10 hours and no go command running: trimmed");
    assert!(given_late.exists(), "used within the hour: kept");
}

#[test]
fn a_damaged_object_is_repaired_by_the_next_put() {
    let tmp = tempfile::tempdir().unwrap();
    let body = b"package export data".repeat(100);
    let path = put_once(tmp.path(), 4, &body);
    fs::write(&path, b"").unwrap();
    let (mut s, _) = Session::start(&["--dir", tmp.path().to_str().unwrap()]);
    s.send_get(1, &[4; 32]);
    assert_eq!(s.recv()["Miss"], json!(true), "a truncated object is never served");
    s.send_put(2, &[4; 32], &body);
    assert_eq!(s.recv()["DiskPath"].as_str(), path.to_str());
    assert_eq!(fs::read(&path).unwrap(), body, "the DiskPath the go command gets holds the output");
    s.send_get(3, &[4; 32]);
    assert_eq!(s.recv()["Size"], json!(body.len()));
    s.send_close(4);
    s.recv();
    s.finish();
}

#[test]
fn a_last_trim_in_the_future_does_not_stop_trimming() {
    let tmp = tempfile::tempdir().unwrap();
    let old = put_once(tmp.path(), 5, &[5; 1000]);
    set_mtime(&old, HOUR * 24 * 10);
    // The clock was a day ahead when the last trim ran.
    let marker = tmp.path().join("objects/last-trim");
    fs::write(&marker, b"").unwrap();
    filetime::set_file_mtime(&marker, filetime::FileTime::from_system_time(SystemTime::now() + HOUR * 24)).unwrap();
    put_once(tmp.path(), 6, &[6; 1000]);
    wait_for_trim(tmp.path());
    assert!(!old.exists(), "unused for 10 days (the default max age is 5): trimmed");
}

#[test]
fn every_put_reaches_a_plugin_that_keeps_only_entries() {
    // Puts arrive far faster than one recording thread stores entries: none
    // may be dropped, or the next build misses them.
    let tmp = tempfile::tempdir().unwrap();
    let stats = tmp.path().join("stats.json");
    let (mut s, _) = Session::start(&["--dir", tmp.path().to_str().unwrap(), "--stats-json", stats.to_str().unwrap()]);
    let n = 20_000u32;
    let writer = {
        let mut stdin = s.take_stdin();
        std::thread::spawn(move || {
            use std::io::Write;
            let mut out = std::io::BufWriter::new(&mut stdin);
            for i in 0..n {
                let body = i.to_le_bytes();
                let mut action = [0u8; 32];
                action[..4].copy_from_slice(&i.to_le_bytes());
                write!(
                    out,
                    "{{\"ID\":{},\"Command\":\"put\",\"ActionID\":\"{}\",\"OutputID\":\"{}\",\"BodySize\":4}}\n\n\"{}\"\n",
                    i + 1,
                    b64(&action),
                    b64(&sha256(&body)),
                    b64(&body)
                )
                .unwrap();
            }
            writeln!(out, "{{\"ID\":{},\"Command\":\"close\"}}\n", n + 1).unwrap();
            out.flush().unwrap();
            drop(out);
            stdin
        })
    };
    for _ in 0..=n {
        s.recv();
    }
    let stdin = writer.join().unwrap();
    drop(stdin);
    let (status, _, stderr) = s.finish();
    assert!(status.success(), "{stderr}");
    let st: Value = serde_json::from_slice(&fs::read(&stats).unwrap()).unwrap();
    assert_eq!(st["puts_not_recorded"], json!(0), "{st}");
    assert_eq!(st["local_only_puts"], json!(0), "{st}");
    let entries = files_under(&tmp.path().join("plugins/disk/entries"));
    assert_eq!(entries.len(), n as usize, "every put's entry is in the plugin");
}

#[test]
fn a_failed_background_trim_is_said_once_by_the_next_session_that_trims() {
    let tmp = tempfile::tempdir().unwrap();
    put_once(tmp.path(), 7, b"x");
    wait_for_trim(tmp.path());
    // What a trimming process leaves when it fails (see local/trimmer.rs).
    fs::write(
        tmp.path().join("objects/trim-error"),
        "trimming the local store: reading objects/00: Input/output error",
    )
    .unwrap();
    let closing = |trim_interval: &str| {
        let (mut s, _) = Session::start(&["--dir", tmp.path().to_str().unwrap(), "--trim-interval", trim_interval]);
        s.send_close(1);
        assert!(s.recv().get("Err").is_none(), "close is never answered with an error");
        let (status, _, stderr) = s.finish();
        assert!(status.success(), "{stderr}");
        wait_for_trim(tmp.path());
        stderr
    };
    assert_eq!(closing("1000d"), "", "no trim due: nothing said yet");
    let said = closing("0s");
    assert_eq!(said.lines().count(), 1, "{said}");
    assert!(said.contains("Input/output error"), "{said}");
    assert_eq!(closing("0s"), "", "said once");
}
