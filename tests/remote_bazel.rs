//! The built-in `http` plugin against bazel-remote, the Bazel remote cache
//! server (built from source, started by each test on 127.0.0.1 with basic
//! auth and `--disable_http_ac_validation`): the scenarios every remote
//! plugin must pass, a body far larger than the plugin's memory, a fork's
//! build reading without credentials, and what happens with bazel-remote's
//! default validation on, which gocp's entries do not pass.

mod support;

use std::io::Read;

use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use support::remote::{self, Backend, Machine, RemoteServer, gocp_lines};
use support::servers::bazel_remote::{BazelRemote, Options};
use support::*;

#[test]
fn two_machines_share_the_cache() {
    remote::shared_cache(&BazelRemote::start());
}

#[test]
fn server_killed_mid_build() {
    remote::down_mid_build(&mut BazelRemote::start());
}

#[test]
fn wrong_password_is_reported_once() {
    remote::bad_credentials(&BazelRemote::start());
}

#[test]
fn conformance() {
    remote::conformance(&BazelRemote::start());
}

#[test]
fn stalled_bodies_pause_the_plugin() {
    remote::stalled_bodies(&BazelRemote::start());
}

#[test]
fn read_only_builds_write_nothing_and_read_what_trusted_builds_signed() {
    remote::read_only_and_signed(&BazelRemote::start());
}

/// Runs one gocp-host for `backend` with state in `dir`: `talk` sends and
/// receives, then the session closes and gocp-host exits, which waits for
/// the background uploads.
fn session(
    backend: &Backend,
    dir: &std::path::Path,
    extra: &[&str],
    talk: impl FnOnce(&mut Session) -> Value,
) -> Value {
    let mut args: Vec<&str> = vec!["--dir", dir.to_str().unwrap()];
    args.extend(backend.args.iter().map(String::as_str));
    args.extend(extra);
    let env: Vec<(&str, &str)> = backend.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let (mut s, _) = Session::start_env(&args, &env);
    let answer = talk(&mut s);
    s.send_close(99);
    s.recv();
    let (status, _, stderr) = s.finish();
    assert!(status.success(), "gocp-host failed: {stderr}");
    assert!(gocp_lines(stderr.as_bytes()).is_empty(), "gocp stays quiet: {stderr}");
    answer
}

#[test]
fn a_body_much_larger_than_the_plugins_memory_goes_up_and_comes_back() {
    const SIZE: u64 = 128 << 20;
    let server = BazelRemote::start();
    let backend = server.backend();
    let tmp = tempfile::tempdir().unwrap();
    // A plugin that buffered the body whole could not hold it.
    let small = ["--plugin-memory", "48MiB", "--plugin-timeout", "120s"];
    let output: [u8; 32] = {
        let (mut hasher, mut state, mut buf) = (Sha256::new(), 11u64, vec![0u8; 1 << 20]);
        for _ in 0..SIZE >> 20 {
            noise(&mut state, &mut buf);
            hasher.update(&buf);
        }
        hasher.finalize().into()
    };

    session(&backend, &tmp.path().join("a"), &small, |s| {
        let mut state = 11u64;
        s.send_put_streamed(1, &[9; 32], &output, SIZE, |b| noise(&mut state, b));
        s.recv()
    });
    let hit = session(&backend, &tmp.path().join("b"), &small, |s| {
        s.send_get(1, &[9; 32]);
        s.recv()
    });
    assert_eq!(hit["Size"], json!(SIZE), "a machine with an empty store gets a hit: {hit}");
    let mut file = std::fs::File::open(hit["DiskPath"].as_str().unwrap()).unwrap();
    let (mut hasher, mut buf) = (Sha256::new(), vec![0u8; 1 << 20]);
    loop {
        let n = file.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    assert_eq!(<[u8; 32]>::from(hasher.finalize()), output, "the body came back whole");
}

/// bazel-remote can serve reads to anyone and want the password for
/// writes only: a fork's job, without secrets, read-only and trusting the
/// team's key, compiles nothing a trusted build signed.
#[test]
fn a_build_without_credentials_reads_what_trusted_builds_signed() {
    require_go();
    let server = BazelRemote::start_with(Options { public_reads: true, ..Options::default() });
    let tmp = tempfile::tempdir().unwrap();
    let (private, public) = remote::keygen(&tmp.path().join("keys"));
    let src = tmp.path().join("src");
    write_module(&src);
    let trusted = Machine::new(&tmp.path().join("trusted"));
    trusted.run(
        &server.backend().with(&["--sign-key", private.to_str().unwrap()]),
        &src,
        &["build", "-trimpath", "./..."],
    );
    let stored = server.stored();

    let fork = Machine::new(&tmp.path().join("fork"));
    let fork_src = tmp.path().join("fork/src");
    write_module(&fork_src);
    let anonymous =
        server.backend_without_credentials().with(&["--read-only", "--trust-key", public.to_str().unwrap()]);
    let out = fork.run(&anonymous, &fork_src, &["build", "-x", "-trimpath", "./..."]);
    assert_eq!(compile_steps(&text(&out.stderr)), Vec::<&str>::new(), "compiled from the signed entries");
    assert_eq!(gocp_lines(&out.stderr), Vec::<String>::new());
    assert_eq!(server.stored(), stored);
}

/// With its default validation, bazel-remote takes only Bazel ActionResults
/// under /ac/ and refuses gocp's entry lines (HTTP 400): what the README
/// says to run it with is needed, and without it a build still succeeds,
/// with one line, its bodies uploaded and its entries kept locally.
#[test]
fn with_ac_validation_on_entries_are_refused_and_the_build_still_succeeds() {
    require_go();
    let server = BazelRemote::start_with(Options { validate_ac: true, ..Options::default() });
    let tmp = tempfile::tempdir().unwrap();
    let machine = Machine::new(tmp.path());
    let src = tmp.path().join("src");
    write_module(&src);
    let out = machine.run(&server.backend(), &src, &["build", "-trimpath", "./..."]);
    let lines = gocp_lines(&out.stderr);
    assert_eq!(lines.len(), 1, "one line from gocp: {lines:?}");
    assert!(lines[0].contains("HTTP 400"), "{}", lines[0]);
    let log = server.log();
    assert!(log.contains("cannot parse invalid wire-format data"), "bazel-remote refused them as protobuf:\n{log}");
    assert!(count_files(&server, "cas.v2") > 0, "bodies went up");
    assert_eq!(count_files(&server, "ac.v2") + count_files(&server, "raw.v2"), 0, "no entry did");
}

fn count_files(server: &BazelRemote, kind: &str) -> usize {
    files_under(&server.data().join(kind)).len()
}
