//! The built-in `gcs` plugin against fake-gcs-server, the emulator Google's
//! client libraries are tested with, behind a front that issues and checks
//! tokens as Google does (see support/servers/fake_gcs.rs), started by each
//! test on 127.0.0.1: the scenarios every remote plugin must pass with a
//! service-account key, and with an access token and a key file; what is
//! particular to this one: a body far larger than the plugin's memory going
//! through a resumable upload, upload dedup and token reuse seen by the
//! front, a fork's build reading a public bucket without credentials,
//! configuration mistakes named at start, and a start that contacts neither
//! the API nor the token endpoint.

mod support;

use std::io::Read;

use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use support::remote::{self, Backend, Machine, RemoteServer, gocp_lines};
use support::servers::fake_gcs::{Credentials, FakeGcs, KEY_VAR};
use support::*;

/// The plugin's own unit tests (the JWT assertion and its RS256 signature,
/// key files it cannot use, addressing, config).
#[test]
fn plugin_unit_tests_pass() {
    plugin_crate_unit_tests("gocp-plugin-gcs");
}

#[test]
fn two_machines_share_the_cache() {
    remote::shared_cache(&FakeGcs::start());
}

#[test]
fn server_killed_mid_build() {
    remote::down_mid_build(&mut FakeGcs::start());
}

#[test]
fn a_key_the_token_endpoint_refuses_is_reported_once() {
    let server = FakeGcs::start();
    remote::bad_credentials(&server);
    assert!(server.assertions_refused() > 0, "the token endpoint saw the assertions and refused them");
    assert_eq!(server.tokens_issued(), 0);
}

#[test]
fn a_token_nobody_issued_is_reported_once() {
    remote::bad_credentials(&FakeGcs::start_with(Credentials::Token, false));
}

#[test]
fn conformance() {
    remote::conformance(&FakeGcs::start());
}

#[test]
fn conformance_with_an_access_token() {
    remote::conformance(&FakeGcs::start_with(Credentials::Token, false));
}

/// GOOGLE_APPLICATION_CREDENTIALS-style: the variable holds the path of the
/// key file, in a directory granted read-only.
#[test]
fn conformance_with_a_key_file() {
    remote::conformance(&FakeGcs::start_with(Credentials::KeyFile, false));
}

#[test]
fn stalled_bodies_pause_the_plugin() {
    remote::stalled_bodies(&FakeGcs::start());
}

#[test]
fn read_only_builds_write_nothing_and_read_what_trusted_builds_signed() {
    remote::read_only_and_signed(&FakeGcs::start());
}

/// A fork's job has no secrets: from a bucket anyone may read, the plugin
/// with `credentials=none`, read-only and trusting the team's key, compiles
/// nothing a trusted build signed.
#[test]
fn a_build_without_credentials_reads_a_public_bucket() {
    require_go();
    let server = FakeGcs::start_with(Credentials::Key, true);
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
    s.send_close(999);
    s.recv();
    let (status, _, stderr) = s.finish();
    assert!(status.success(), "gocp-host failed: {stderr}");
    assert!(gocp_lines(stderr.as_bytes()).is_empty(), "gocp stays quiet: {stderr}");
    answer
}

fn hexs(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn a_body_much_larger_than_the_plugins_memory_goes_through_a_resumable_upload_and_comes_back() {
    const SIZE: u64 = 160 << 20;
    let server = FakeGcs::start();
    let backend = server.backend();
    let tmp = tempfile::tempdir().unwrap();
    // A plugin that held the body, or a chunk too many, could not fit.
    let small = ["--plugin-memory", "48MiB", "--plugin-timeout", "120s"];
    let output: [u8; 32] = {
        let (mut hasher, mut state, mut buf) = (Sha256::new(), 7u64, vec![0u8; 1 << 20]);
        for _ in 0..SIZE >> 20 {
            noise(&mut state, &mut buf);
            hasher.update(&buf);
        }
        hasher.finalize().into()
    };
    session(&backend, &tmp.path().join("a"), &small, |s| {
        let mut state = 7u64;
        s.send_put_streamed(1, &[9; 32], &output, SIZE, |b| noise(&mut state, b));
        s.recv()
    });
    let requests = server.requests();
    let cas = format!("name=gocp%2Fcas%2F{}", hexs(&output));
    let opened =
        requests.iter().filter(|r| r.starts_with("POST ") && r.contains("uploadType=resumable") && r.contains(&cas));
    assert_eq!(opened.count(), 1, "one upload session: {requests:#?}");
    let chunks = requests.iter().filter(|r| r.starts_with("PUT ") && r.contains("upload_id=") && r.contains(&cas));
    assert_eq!(chunks.count(), 10, "16 MiB a request: {requests:#?}");

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

/// A second machine with the same output under another action finds it in
/// the bucket and does not send it; and an instance asks the token
/// endpoint once, not once a request.
#[test]
fn a_body_already_in_the_bucket_is_not_uploaded_again_and_tokens_are_reused() {
    let server = FakeGcs::start();
    let backend = server.backend();
    let tmp = tempfile::tempdir().unwrap();
    // Noise: gocp stores what compresses well compressed, under another name.
    let mut body = vec![0u8; 300_000];
    noise(&mut 3, &mut body);
    let cas = format!("name=gocp%2Fcas%2F{}", hexs(&sha256(&body)));
    let one = ["--instances", "1"];
    for (machine, action) in [("a", [1u8; 32]), ("b", [2u8; 32])] {
        session(&backend, &tmp.path().join(machine), &one, |s| {
            s.send_put(1, &action, &body);
            s.recv();
            for i in 0..20u8 {
                s.send_get(i64::from(i) + 2, &[i + 100; 32]);
                assert_eq!(s.recv()["Miss"], json!(true));
            }
            Value::Null
        });
    }
    let requests = server.requests();
    let uploads = requests.iter().filter(|r| r.starts_with("POST /upload/") && r.contains(&cas)).count();
    assert_eq!(uploads, 1, "B found the body in the bucket: {requests:#?}");
    assert_eq!(server.tokens_issued(), 2, "one token per instance, for {} requests", requests.len());
}

fn fails_to_start(args: &[&str], env: &[(&str, &str)]) -> String {
    let stderr = remote::fails_to_start("gcs", args, env);
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    stderr
}

#[test]
fn configuration_mistakes_stop_gocp_with_one_line_saying_what_to_change() {
    let base = ["--config", "bucket=acme-cache"];
    let with = |extra: &[&'static str]| -> Vec<&'static str> { base.iter().chain(extra).copied().collect() };
    assert!(fails_to_start(&[], &[]).contains("--config bucket="));
    assert!(fails_to_start(&with(&[]), &[]).contains("key-env=VAR"));
    // A variable that is set but not granted is absent inside the plugin.
    let e = fails_to_start(&with(&["--config", "token-env=T"]), &[("T", "ya29.x")]);
    assert!(e.contains("grant it with --allow-env T"), "{e}");
    let key =
        |value: &'static str| fails_to_start(&with(&["--config", "key-env=K", "--allow-env", "K"]), &[("K", value)]);
    let e = key(
        "{\"type\": \"service_account\", \"client_email\": \"a@b\", \"private_key\": \"-----BEGIN PRIVATE KEY-----\\nc2VjcmV0\\n-----END PRIVATE KEY-----\\n\"}",
    );
    assert!(e.contains("not an RSA key") && !e.contains("c2VjcmV0"), "the key is never echoed: {e}");
    let e = key("{\"type\": \"external_account\"}");
    assert!(e.contains("token-env"), "workload identity federation files are named: {e}");
    let e = key("/nowhere/key.json");
    assert!(e.contains("--allow-dir"), "a key file out of reach: {e}");
    for (config, says) in [
        ("bucket=Acme", "a bucket name has 3 to 222 characters"),
        ("endpoint=ftp://127.0.0.1:1", "only http and https"),
        ("endpoint=http://127.0.0.1:1/api", "without a path"),
        ("timeout=soon", "expected a duration"),
        ("prefix=/abs", "no leading /"),
        ("project=x", "unknown configuration key(s): project"),
    ] {
        let e = fails_to_start(&with(&["--config", "credentials=none", "--config", config]), &[]);
        assert!(e.contains(says), "{config}: {e}");
    }
}

#[test]
fn starting_contacts_neither_the_api_nor_the_token_endpoint() {
    // Nothing listens at either: start-up still succeeds, as does the end.
    let (api, token) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let key = json!({
        "type": "service_account",
        "client_email": "a@b.iam.gserviceaccount.com",
        "private_key": test_private_key(),
        "token_uri": format!("http://127.0.0.1:{token}/token"),
    })
    .to_string();
    let endpoint = format!("endpoint=http://127.0.0.1:{api}");
    let key_env = format!("key-env={KEY_VAR}");
    let grants = [format!("127.0.0.1:{api}"), format!("127.0.0.1:{token}")];
    let (s, caps) = Session::start_env(
        &[
            "--dir",
            dir.path().to_str().unwrap(),
            "--plugin",
            "gcs",
            "--config",
            "bucket=acme-cache",
            "--config",
            &endpoint,
            "--config",
            &key_env,
            "--allow-env",
            KEY_VAR,
            "--allow-net",
            &grants[0],
            "--allow-net",
            &grants[1],
        ],
        &[(KEY_VAR, &key)],
    );
    assert!(caps["KnownCommands"].is_array(), "{caps}");
    let (status, _, stderr) = s.finish();
    assert!(status.success() && !stderr.contains("gocp"), "{stderr}");
}

/// A throwaway RSA key in PKCS#8 PEM, made by openssl.
fn test_private_key() -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("openssl")
        .args(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"])
        .current_dir(dir.path())
        .output_within(std::time::Duration::from_secs(60));
    assert!(out.status.success(), "openssl genpkey: {}", text(&out.stderr));
    text(&out.stdout)
}
