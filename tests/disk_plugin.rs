//! The built-in `disk` plugin as users run it: entries only by default (no
//! second copy of every body), bodies too in a shared directory, and trimming.

mod support;

use std::fs;
use std::path::Path;
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use support::*;

fn put_and_close(args: &[&str], n: u8, body: &[u8]) -> Value {
    let (mut s, _) = Session::start(args);
    s.send_put(1, &[n; 32], body);
    let r = s.recv();
    s.send_close(2);
    s.recv();
    let (status, _, stderr) = s.finish();
    assert!(status.success(), "{stderr}");
    r
}

fn get_and_close(args: &[&str], n: u8) -> Value {
    let (mut s, _) = Session::start(args);
    s.send_get(1, &[n; 32]);
    let r = s.recv();
    s.send_close(2);
    s.recv();
    let (status, _, stderr) = s.finish();
    assert!(status.success(), "{stderr}");
    r
}

#[test]
fn default_setup_keeps_each_body_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let body = vec![42u8; 100_000];
    put_and_close(&["--dir", d], 1, &body);
    let plugin_files = files_under(&dir.path().join("plugins/disk"));
    let plugin_bytes: u64 = plugin_files.iter().map(|p| fs::metadata(p).unwrap().len()).sum();
    assert!(plugin_files.iter().any(|p| p.to_str().unwrap().contains("/entries/")), "{plugin_files:?}");
    assert!(plugin_bytes < 1000, "the plugin stores {plugin_bytes} bytes: a second copy of the body?");
    let hit = get_and_close(&["--dir", d], 1);
    assert_eq!(hit["Size"], json!(100_000));
}

#[test]
fn a_shared_directory_serves_another_machine() {
    let shared = tempfile::tempdir().unwrap();
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let grant = format!("{}:/shared", shared.path().display());
    let args = |state: &Path| -> Vec<String> {
        ["--dir", state.to_str().unwrap(), "--allow-dir", &grant, "--config", "path=/shared"].map(String::from).to_vec()
    };
    let args_a = args(a.path());
    let args_b = args(b.path());
    let body: Vec<u8> = (0..250_000u32).map(|i| (i % 253) as u8).collect();
    put_and_close(&args_a.iter().map(String::as_str).collect::<Vec<_>>(), 7, &body);
    assert!(
        files_under(shared.path()).iter().any(|p| p.to_str().unwrap().contains("/bodies/")),
        "bodies are kept in a shared directory"
    );
    // Machine B has never seen this output: it comes from the shared
    // directory, is verified, and lands in B's own store.
    let hit = get_and_close(&args_b.iter().map(String::as_str).collect::<Vec<_>>(), 7);
    let path = hit["DiskPath"].as_str().unwrap_or_else(|| panic!("{hit}"));
    assert!(path.starts_with(b.path().to_str().unwrap()), "{path}");
    assert_eq!(fs::read(path).unwrap(), body);
}

#[test]
fn a_corrupted_shared_body_is_never_served() {
    let shared = tempfile::tempdir().unwrap();
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let grant = format!("{}:/shared", shared.path().display());
    let stats = b.path().join("stats.json");
    let body = vec![9u8; 50_000];
    let a_args = ["--dir", a.path().to_str().unwrap(), "--allow-dir", &grant, "--config", "path=/shared"];
    put_and_close(&a_args, 3, &body);
    let stored = files_under(&shared.path().join("bodies"));
    assert_eq!(stored.len(), 1);
    let mut bad = body.clone();
    bad[100] ^= 1;
    fs::write(&stored[0], &bad).unwrap();
    let b_args = [
        "--dir",
        b.path().to_str().unwrap(),
        "--allow-dir",
        &grant,
        "--config",
        "path=/shared",
        "--stats-json",
        stats.to_str().unwrap(),
    ];
    let (mut s, _) = Session::start(&b_args);
    s.send_get(1, &[3; 32]);
    assert_eq!(s.recv()["Miss"], json!(true), "a body that does not hash to its output id is a miss");
    s.send_close(2);
    s.recv();
    let (status, _, stderr) = s.finish();
    assert!(status.success());
    assert!(stderr.contains("rejected a body"), "one line tells the user: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    let st: Value = serde_json::from_slice(&fs::read(&stats).unwrap()).unwrap();
    assert_eq!(st["rejected_bodies"], json!(1), "{st}");
}

fn age(path: &Path, by: Duration) {
    let t = SystemTime::now() - by;
    filetime::set_file_mtime(path, filetime::FileTime::from_system_time(t)).unwrap();
}

#[test]
fn trimming_removes_what_went_unused() {
    let shared = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let grant = format!("{}:/shared", shared.path().display());
    let d = state.path().to_str().unwrap();
    let base = ["--dir", d, "--allow-dir", &grant, "--config", "path=/shared"];
    put_and_close(&base, 1, &vec![1u8; 40_000]);
    put_and_close(&base, 2, &vec![2u8; 40_000]);
    put_and_close(&base, 3, &vec![3u8; 40_000]);
    // Entry 1 and its body went unused for ten days.
    for p in files_under(shared.path()) {
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        if name == hex::encode([1u8; 32]) || name == hex::encode(sha256(&vec![1u8; 40_000])) {
            age(&p, Duration::from_secs(10 * 86_400));
        }
    }
    let mut trim = base.to_vec();
    trim.extend(["--config", "trim-interval=0s", "--config", "max-size=50000"]);
    get_and_close(&trim, 9);
    let remaining = files_under(&shared.path().join("bodies"));
    assert_eq!(remaining.len(), 1, "the old body went by age, one more by size: {remaining:?}");
    assert!(remaining[0].ends_with(hex::encode(sha256(&vec![3u8; 40_000]))), "the most recent stays");
    let entries = files_under(&shared.path().join("entries"));
    assert_eq!(entries.len(), 2, "only the unused entry is trimmed: {entries:?}");
    assert!(!entries.iter().any(|p| p.ends_with(hex::encode([1u8; 32]))));

    // The host's own store trims by its flags, at most once per interval.
    let objects = || {
        files_under(&state.path().join("objects"))
            .into_iter()
            .filter(|p| p.parent().unwrap().file_name().unwrap().len() == 2)
            .count()
    };
    assert_eq!(objects(), 3);
    put_and_close(&["--dir", d, "--max-size", "50000", "--trim-interval", "0s"], 5, b"");
    assert!(objects() <= 2, "local store trimmed to its size bound");
}
