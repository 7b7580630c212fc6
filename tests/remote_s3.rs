//! The built-in `s3` plugin against a real S3-compatible server (versitygw on
//! 127.0.0.1): the scenarios every remote plugin must pass, and what is
//! particular to S3: bodies already in the bucket are not uploaded again, a
//! body far larger than the plugin's memory goes through, the prefix keeps
//! projects apart, and configuration mistakes stop gocp with what to change.

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde_json::json;
use support::remote::{self, RemoteServer};
use support::servers::s3::{SECRET_KEY, Versitygw, objects_under};
use support::*;

#[test]
fn shared_cache() {
    remote::shared_cache(&Versitygw::start());
}

#[test]
fn down_mid_build() {
    remote::down_mid_build(&mut Versitygw::start());
}

#[test]
fn bad_credentials() {
    remote::bad_credentials(&Versitygw::start());
}

#[test]
fn conformance() {
    remote::conformance(&Versitygw::start());
}

/// The session's flags: `backend`'s plus a state directory of its own.
fn session_args(backend: &remote::Backend, state: &Path, extra: &[&str]) -> Vec<String> {
    let mut args = backend.args.clone();
    args.extend(["--dir".to_string(), state.display().to_string()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn start(backend: &remote::Backend, args: &[String]) -> Session {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let env: Vec<(&str, &str)> = backend.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Session::start_env(&args, &env).0
}

/// Ends a session the way cmd/go does and waits for gocp-host to finish
/// its background uploads and exit.
fn close(mut s: Session, id: i64) -> String {
    s.send_close(id);
    s.recv();
    let (status, _, stderr) = s.finish();
    assert!(status.success(), "gocp-host failed: {stderr}");
    stderr
}

/// Identity of each stored object: a re-upload replaces the file, so its
/// inode changes even when the bytes do not.
fn inodes(dir: &Path) -> BTreeMap<PathBuf, u64> {
    objects_under(dir).into_iter().map(|p| (p.clone(), fs::metadata(&p).unwrap().ino())).collect()
}

#[test]
fn a_body_already_in_the_bucket_is_not_uploaded_again() {
    let server = Versitygw::start();
    let backend = server.backend();
    let tmp = tempfile::tempdir().unwrap();
    // Noise: gocp stores what compresses well compressed, under another name.
    let body = noise_body(3, 300_000);

    let s = {
        let mut s = start(&backend, &session_args(&backend, &tmp.path().join("a"), &[]));
        s.send_put(1, &[1; 32], &body);
        s.recv();
        s
    };
    assert_eq!(close(s, 2), "");
    let cas = server.bucket_dir().join("gocp/cas");
    let before = inodes(&cas);
    assert_eq!(before.len(), 1, "one body stored: {before:?}");

    // Another machine produces the same output under another action.
    let mut s = start(&backend, &session_args(&backend, &tmp.path().join("b"), &[]));
    s.send_put(1, &[2; 32], &body);
    s.recv();
    assert_eq!(close(s, 2), "");
    assert_eq!(inodes(&cas), before, "the body was not written again");
    assert_eq!(objects_under(&server.bucket_dir().join("gocp/ac")).len(), 2, "both entries stored");
}

#[test]
fn a_body_larger_than_the_plugin_memory_goes_through_the_bucket() {
    const SIZE: u64 = 160 << 20;
    let server = Versitygw::start();
    let backend = server.backend();
    let tmp = tempfile::tempdir().unwrap();
    let output: [u8; 32] = {
        let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
        let (mut state, mut left, mut chunk) = (3u64, SIZE, vec![0u8; 3 << 20]);
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            noise(&mut state, &mut chunk[..n]);
            sha2::Digest::update(&mut hasher, &chunk[..n]);
            left -= n as u64;
        }
        sha2::Digest::finalize(hasher).into()
    };
    // A plugin that held the body in memory would trap at this limit.
    let limits = ["--plugin-memory", "48MiB", "--plugin-timeout", "120s"];

    let mut s = start(&backend, &session_args(&backend, &tmp.path().join("a"), &limits));
    let mut state = 3u64;
    s.send_put_streamed(1, &[9; 32], &output, SIZE, |buf| noise(&mut state, buf));
    s.recv();
    assert_eq!(close(s, 2), "", "gocp stays quiet");
    let stored =
        server.bucket_dir().join("gocp/cas").join(output.iter().map(|b| format!("{b:02x}")).collect::<String>());
    assert_eq!(fs::metadata(&stored).map(|m| m.len()).ok(), Some(SIZE), "the whole body is in the bucket");

    let mut s = start(&backend, &session_args(&backend, &tmp.path().join("b"), &limits));
    s.send_get(1, &[9; 32]);
    let hit = s.recv();
    let path = hit["DiskPath"].as_str().unwrap_or_else(|| panic!("a machine with an empty store gets a hit: {hit}"));
    let on_disk: [u8; 32] = {
        let mut h = <sha2::Sha256 as sha2::Digest>::new();
        std::io::copy(&mut fs::File::open(path).unwrap(), &mut h).unwrap();
        sha2::Digest::finalize(h).into()
    };
    assert_eq!(on_disk, output, "the body came back whole");
    assert_eq!(close(s, 2), "");
}

#[test]
fn the_prefix_keeps_projects_apart() {
    let server = Versitygw::start();
    let tmp = tempfile::tempdir().unwrap();
    let team = |name: &str| server.backend_with(&[&format!("prefix={name}/gocp/")], SECRET_KEY);
    // Too large to travel inside its entry, and not compressible: a body of its own.
    let body: Vec<u8> = (0..64u8).flat_map(|i| sha256(&[b'a', i])).collect();

    let (a, b, c) = (team("team-a"), team("team-b"), team("team-a"));
    let mut s = start(&a, &session_args(&a, &tmp.path().join("a"), &[]));
    s.send_put(1, &[4; 32], &body);
    s.recv();
    assert_eq!(close(s, 2), "");
    let bucket = server.bucket_dir();
    let tops: Vec<_> = fs::read_dir(&bucket).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(tops.iter().all(|n| n == "team-a" || n == ".sgwtmp"), "only team-a's objects: {tops:?}");
    assert_eq!(objects_under(&bucket.join("team-a/gocp/ac")).len(), 1);
    assert_eq!(objects_under(&bucket.join("team-a/gocp/cas")).len(), 1);

    let mut s = start(&b, &session_args(&b, &tmp.path().join("b"), &[]));
    s.send_get(1, &[4; 32]);
    assert_eq!(s.recv()["Miss"], json!(true), "team-b sees nothing of team-a's");
    assert_eq!(close(s, 2), "");

    let mut s = start(&c, &session_args(&c, &tmp.path().join("c"), &[]));
    s.send_get(1, &[4; 32]);
    let hit = s.recv();
    let path = hit["DiskPath"].as_str().unwrap_or_else(|| panic!("another team-a machine gets it: {hit}"));
    assert_eq!(fs::read(path).unwrap(), body);
    assert_eq!(close(s, 2), "");
}

fn refused(args: &[&str], env: &[(&str, &str)]) -> String {
    remote::fails_to_start("s3", args, env)
}

#[test]
fn configuration_mistakes_stop_gocp_and_say_what_to_change() {
    let creds = [("AWS_ACCESS_KEY_ID", "k"), ("AWS_SECRET_ACCESS_KEY", "s")];
    let granted = ["--allow-env", "AWS_ACCESS_KEY_ID", "--allow-env", "AWS_SECRET_ACCESS_KEY"];
    let with = |extra: &[&'static str]| -> Vec<&'static str> { granted.iter().chain(extra).copied().collect() };

    let stderr = refused(&with(&[]), &creds);
    assert!(stderr.contains("--config bucket="), "{stderr}");

    let stderr = refused(&["--config", "bucket=b"], &creds);
    assert!(stderr.contains("grant it with --allow-env AWS_ACCESS_KEY_ID"), "an ungranted variable: {stderr}");

    let stderr = refused(&with(&["--config", "bucket=b", "--config", "secret-access-key-env=MY_SECRET"]), &creds);
    assert!(stderr.contains("set MY_SECRET and grant it with --allow-env MY_SECRET"), "{stderr}");

    for (config, says) in [
        ("addressing=sideways", "expected path or virtual"),
        ("endpoint=ftp://127.0.0.1:21", "only http and https"),
        ("endpoint=http://user:pw@127.0.0.1:7070", "credentials do not belong in the URL"),
        ("timeout=soon", "expected a duration"),
        ("prefix=/abs", "no leading /"),
        ("secret-access-key=s", "unknown configuration key(s): secret-access-key"),
    ] {
        let stderr = refused(&with(&["--config", "bucket=b", "--config", config]), &creds);
        assert!(stderr.contains(says), "{config}: {stderr}");
    }
}

/// A server that is not there: gets are misses, puts are kept locally, and
/// gocp says once what failed and where.
#[test]
fn no_server_at_the_endpoint_is_named_in_one_line() {
    let mut server = Versitygw::start();
    let backend = server.backend();
    server.stop();
    let tmp = tempfile::tempdir().unwrap();
    let mut s = start(&backend, &session_args(&backend, tmp.path(), &[]));
    s.send_get(1, &[5; 32]);
    assert_eq!(s.recv()["Miss"], json!(true));
    s.send_put(2, &[5; 32], b"kept locally");
    assert!(s.recv()["DiskPath"].is_string(), "the put is answered");
    s.send_get(3, &[5; 32]);
    assert!(s.recv()["DiskPath"].is_string(), "and served from the local store");
    let stderr = close(s, 4);
    let lines = remote::gocp_lines(stderr.as_bytes());
    let address = &server.endpoint()["http://".len()..];
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("connection refused") && lines[0].contains(address), "{}", lines[0]);
}

#[test]
fn stalled_bodies_pause_the_plugin() {
    remote::stalled_bodies(&Versitygw::start());
}

#[test]
fn read_only_builds_write_nothing_and_read_what_trusted_builds_signed() {
    remote::read_only_and_signed(&Versitygw::start());
}
