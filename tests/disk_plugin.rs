//! The built-in `disk` plugin as users run it: entries only by default (no
//! second copy of every body), bodies too in a shared directory, and trimming.

mod support;

use std::fs;
use std::path::Path;
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use support::*;

/// A close may start a trim in the background (see host/src/local/trimmer.rs):
/// the next step of a test waits for it, as it would for a trim done inline.
fn wait_for_background_trim(args: &[&str]) {
    if let Some(i) = args.iter().position(|a| *a == "--dir") {
        wait_for_trim(Path::new(args[i + 1]));
    }
}

fn put_and_close(args: &[&str], n: u8, body: &[u8]) -> Value {
    let (mut s, _) = Session::start(args);
    s.send_put(1, &[n; 32], body);
    let r = s.recv();
    s.send_close(2);
    s.recv();
    let (status, _, stderr) = s.finish();
    assert!(status.success(), "{stderr}");
    wait_for_background_trim(args);
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
    wait_for_background_trim(args);
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
    // Entry 1 and its body went unused for ten days, body 2 for three hours
    // (uses refresh times hourly, so hours are as fine as the order gets).
    for p in files_under(shared.path()) {
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        if name == hex::encode([1u8; 32]) || name == hex::encode(sha256(&vec![1u8; 40_000])) {
            age(&p, Duration::from_secs(10 * 86_400));
        }
        if name == hex::encode(sha256(&vec![2u8; 40_000])) {
            age(&p, Duration::from_secs(3 * 3600));
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
    // Outputs used within the last hour are never trimmed (a go command may
    // still read them), so these two went unused for longer.
    for (n, ago) in [(1u8, 10 * 86_400), (2, 3 * 3600)] {
        let object = hex::encode(sha256(&vec![n; 40_000]));
        age(&state.path().join("objects").join(&object[..2]).join(&object), Duration::from_secs(ago));
    }
    put_and_close(&["--dir", d, "--max-size", "50000", "--trim-interval", "0s"], 5, b"");
    wait_for_trim(state.path());
    assert!(objects() <= 2, "local store trimmed to its size bound");
}

/// Entries under `dir` (the disk plugin's layout) written by hand, as weeks
/// of builds would leave them: `n` of them, unused for ten days.
fn stale_entries(dir: &Path, n: u32) {
    let old = filetime::FileTime::from_system_time(SystemTime::now() - Duration::from_secs(10 * 86_400));
    for shard in 0..256 {
        fs::create_dir_all(dir.join("entries").join(format!("{shard:02x}"))).unwrap();
    }
    for i in 0..n {
        let name = hex::encode(sha256(&i.to_le_bytes()));
        let path = dir.join("entries").join(&name[..2]).join(&name);
        fs::write(&path, format!("v1 {} 4 1\n", "ab".repeat(32))).unwrap();
        filetime::set_file_mtime(&path, old).unwrap();
    }
}

#[test]
fn trimming_a_large_directory_makes_progress_at_every_run() {
    let shared = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let stats = state.path().join("stats.json");
    let n = 60_000;
    stale_entries(shared.path(), n);
    let grant = format!("{}:/shared", shared.path().display());
    // The local store's trim is not due, so no background trim finishes the
    // plugin's pass: only each go command's own step does.
    fs::create_dir_all(state.path().join("objects")).unwrap();
    fs::write(state.path().join("objects/last-trim"), b"").unwrap();
    // More files than one finish call can even list within its deadline.
    let args = [
        "--dir",
        state.path().to_str().unwrap(),
        "--stats-json",
        stats.to_str().unwrap(),
        "--allow-dir",
        &grant,
        "--config",
        "path=/shared",
        "--config",
        "trim-interval=1s",
        "--plugin-timeout",
        "1s",
        "--instances",
        "2",
    ];
    let left = || files_under(&shared.path().join("entries")).len();
    let mut counts = vec![left()];
    let mut said_behind = 0;
    for _ in 0..80 {
        let (mut s, _) = Session::start(&args);
        s.send_close(1);
        s.recv();
        let (status, _, stderr) = s.finish();
        assert!(status.success(), "{stderr}");
        let st: Value = serde_json::from_slice(&fs::read(&stats).unwrap()).unwrap();
        assert_eq!((st["plugin_stuck"].as_u64(), st["plugin_timeouts"].as_u64()), (Some(0), Some(0)), "{st}");
        said_behind += stderr.lines().filter(|l| l.contains("is behind")).count();
        assert!(stderr.lines().all(|l| l.contains("is behind")), "{stderr}");
        counts.push(left());
        if left() == 0 {
            break;
        }
        let last = &counts[counts.len() - 2..];
        assert!(last[1] < last[0], "a run made no progress: {counts:?}");
    }
    assert_eq!(left(), 0, "all {n} stale entries trimmed, a step per run: {counts:?}");
    assert!(counts.len() > 2, "in several runs, each within its deadline: {counts:?}");
    assert!(said_behind >= 1, "a pass longer than the trim interval is said: {counts:?}");
}

#[test]
fn a_large_trim_is_finished_in_the_background_after_the_go_command_has_its_answer() {
    let shared = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let n = 60_000;
    stale_entries(shared.path(), n);
    let grant = format!("{}:/shared", shared.path().display());
    let d = state.path().to_str().unwrap();
    let (mut s, _) = Session::start(&["--dir", d, "--allow-dir", &grant, "--config", "path=/shared"]);
    s.send_close(1);
    s.recv();
    let (status, _, stderr) = s.finish();
    assert!(status.success(), "{stderr}");
    let left_at_close = files_under(&shared.path().join("entries")).len();
    assert!(left_at_close > 0, "one go command's step cannot trim {n} entries");
    wait_for_trim(state.path());
    assert_eq!(files_under(&shared.path().join("entries")).len(), 0, "the background trim finished the pass");
}

#[test]
fn a_read_only_session_leaves_the_plugins_trim_to_the_others() {
    let shared = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    stale_entries(shared.path(), 60_000);
    let grant = format!("{}:/shared", shared.path().display());
    let d = state.path().to_str().unwrap();
    let (mut s, _) = Session::start(&["--dir", d, "--allow-dir", &grant, "--config", "path=/shared", "--read-only"]);
    s.send_close(1);
    s.recv();
    let (status, _, stderr) = s.finish();
    assert!(status.success(), "{stderr}");
    wait_for_trim(state.path());
    assert!(state.path().join("objects/last-trim").exists(), "the local store's trim ran");
    assert!(
        !files_under(&shared.path().join("entries")).is_empty(),
        "no background housekeeping in the plugin's storage"
    );
}

#[test]
fn a_last_trim_in_the_future_does_not_stop_the_plugin_trimming() {
    let shared = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    stale_entries(shared.path(), 1000);
    let future = SystemTime::now() + Duration::from_secs(86_400);
    let ns = future.duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    fs::write(shared.path().join("last-trim"), ns.to_string()).unwrap();
    let grant = format!("{}:/shared", shared.path().display());
    get_and_close(&["--dir", state.path().to_str().unwrap(), "--allow-dir", &grant, "--config", "path=/shared"], 1);
    assert_eq!(files_under(&shared.path().join("entries")).len(), 0, "unused for 10 days: trimmed");
}
