//! The built-in `azure` plugin against Azurite, Microsoft's Azure Storage
//! emulator, started by each test on 127.0.0.1: the scenarios every remote
//! plugin must pass, with the account key (Shared Key) and with a SAS, and
//! what is particular to this one: a body far larger than the plugin's
//! memory going up in blocks, upload dedup seen in the emulator's log, a
//! fork's build reading a public container without credentials,
//! configuration mistakes named at start, and a start that never contacts
//! the service.

mod support;

use std::io::Read;

use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use support::remote::{self, Backend, Machine, RemoteServer, gocp_lines};
use support::servers::azurite::{Azurite, Credentials, KEY_VAR};
use support::*;

/// The plugin's own unit tests (Shared Key strings, addressing, config).
#[test]
fn plugin_unit_tests_pass() {
    plugin_crate_unit_tests("gocp-plugin-azure");
}

#[test]
fn two_machines_share_the_cache() {
    remote::shared_cache(&Azurite::start());
}

#[test]
fn server_killed_mid_build() {
    remote::down_mid_build(&mut Azurite::start());
}

#[test]
fn a_wrong_account_key_is_reported_once() {
    remote::bad_credentials(&Azurite::start());
}

#[test]
fn conformance() {
    remote::conformance(&Azurite::start());
}

#[test]
fn conformance_with_a_sas() {
    remote::conformance(&Azurite::start_with(Credentials::Sas, false));
}

#[test]
fn a_sas_signed_with_another_key_is_reported_once() {
    remote::bad_credentials(&Azurite::start_with(Credentials::Sas, false));
}

#[test]
fn stalled_bodies_pause_the_plugin() {
    remote::stalled_bodies(&Azurite::start());
}

#[test]
fn read_only_builds_write_nothing_and_read_what_trusted_builds_signed() {
    remote::read_only_and_signed(&Azurite::start());
}

/// A fork's job has no secrets: from a container that lets anyone read
/// blobs, the plugin with `credentials=none`, read-only and trusting the
/// team's key, compiles nothing a trusted build signed.
#[test]
fn a_build_without_credentials_reads_a_public_container() {
    require_go();
    let server = Azurite::start_with(Credentials::SharedKey, true);
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
    s.send_close(99);
    s.recv();
    let (status, _, stderr) = s.finish();
    assert!(status.success(), "gocp-host failed: {stderr}");
    assert!(gocp_lines(stderr.as_bytes()).is_empty(), "gocp stays quiet: {stderr}");
    answer
}

/// How many requests in the emulator's log had `method` and a URL holding
/// `path_part` and `query_part`.
fn requests(server: &Azurite, method: &str, path_part: &str, query_part: &str) -> usize {
    server
        .log()
        .lines()
        .filter_map(|l| l.split('"').nth(1))
        .filter(|r| r.starts_with(&format!("{method} ")) && r.contains(path_part) && r.contains(query_part))
        .count()
}

#[test]
fn a_body_much_larger_than_the_plugins_memory_goes_up_in_blocks_and_comes_back() {
    const SIZE: u64 = 160 << 20;
    let server = Azurite::start();
    let backend = server.backend();
    let tmp = tempfile::tempdir().unwrap();
    // A plugin that held the body, or one block too many, could not fit.
    let small = ["--plugin-memory", "48MiB", "--plugin-timeout", "120s"];
    let output: [u8; 32] = {
        let (mut hasher, mut state, mut buf) = (Sha256::new(), 5u64, vec![0u8; 1 << 20]);
        for _ in 0..SIZE >> 20 {
            noise(&mut state, &mut buf);
            hasher.update(&buf);
        }
        hasher.finalize().into()
    };
    session(&backend, &tmp.path().join("a"), &small, |s| {
        let mut state = 5u64;
        s.send_put_streamed(1, &[9; 32], &output, SIZE, |b| noise(&mut state, b));
        s.recv()
    });
    assert!(requests(&server, "PUT", "/cas/", "comp=block&") >= 10, "16 MiB blocks:\n{}", server.log());
    assert_eq!(requests(&server, "PUT", "/cas/", "comp=blocklist"), 1, "committed once:\n{}", server.log());

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

#[test]
fn a_body_already_in_the_container_is_not_uploaded_again() {
    let server = Azurite::start();
    let backend = server.backend();
    let tmp = tempfile::tempdir().unwrap();
    // Noise: gocp stores what compresses well compressed, under another name.
    let mut body = vec![0u8; 300_000];
    noise(&mut 3, &mut body);
    // Two machines produce the same output under different actions.
    for (machine, action) in [("a", [1u8; 32]), ("b", [2u8; 32])] {
        session(&backend, &tmp.path().join(machine), &[], |s| {
            s.send_put(1, &action, &body);
            s.recv()
        });
    }
    let cas = format!("/cas/{}", sha256(&body).iter().map(|b| format!("{b:02x}")).collect::<String>());
    assert_eq!(requests(&server, "PUT", &cas, ""), 1, "B found the body and did not send it:\n{}", server.log());
    assert!(requests(&server, "HEAD", &cas, "") >= 2, "each machine asked first:\n{}", server.log());
    for action in [[1u8; 32], [2u8; 32]] {
        let ac = format!("/ac/{}", action.iter().map(|b| format!("{b:02x}")).collect::<String>());
        assert_eq!(requests(&server, "PUT", &ac, ""), 1, "both entries went up:\n{}", server.log());
    }
}

fn fails_to_start(args: &[&str], env: &[(&str, &str)]) -> String {
    let stderr = remote::fails_to_start("azure", args, env);
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    stderr
}

#[test]
fn configuration_mistakes_stop_gocp_with_one_line_saying_what_to_change() {
    let base = ["--config", "account=acme", "--config", "container=go-cache"];
    let with = |extra: &[&'static str]| -> Vec<&'static str> { base.iter().chain(extra).copied().collect() };
    assert!(fails_to_start(&[], &[]).contains("--config account="));
    assert!(fails_to_start(&with(&[]), &[]).contains("key-env=VAR"));
    // A variable that is set but not granted is absent inside the plugin.
    let e = fails_to_start(&with(&["--config", "key-env=K"]), &[("K", "a2V5")]);
    assert!(e.contains("grant it with --allow-env K"), "{e}");
    let e = fails_to_start(&with(&["--config", "key-env=K", "--allow-env", "K"]), &[("K", "not base64!")]);
    assert!(e.contains("does not hold an account key") && !e.contains("not base64"), "the value is never echoed: {e}");
    let e = fails_to_start(&with(&["--config", "sas-env=S", "--allow-env", "S"]), &[("S", "sv=2021-12-02&sp=r")]);
    assert!(e.contains("does not hold a SAS token"), "{e}");
    for (config, says) in [
        ("container=Go_Cache", "a container name has 3 to 63 characters"),
        ("endpoint=ftp://127.0.0.1:10000/acme", "only http and https"),
        ("timeout=soon", "expected a duration"),
        ("prefix=/abs", "no leading /"),
        ("account-key=x", "unknown configuration key(s): account-key"),
    ] {
        let e = fails_to_start(&with(&["--config", "credentials=none", "--config", config]), &[]);
        assert!(e.contains(says), "{config}: {e}");
    }
}

#[test]
fn starting_never_contacts_the_service() {
    // Nothing listens at the endpoint: start-up still succeeds.
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let endpoint = format!("endpoint=http://127.0.0.1:{port}/acme");
    let grant = format!("127.0.0.1:{port}");
    let key_env = format!("key-env={KEY_VAR}");
    let (s, caps) = Session::start_env(
        &[
            "--dir",
            dir.path().to_str().unwrap(),
            "--plugin",
            "azure",
            "--config",
            "account=acme",
            "--config",
            "container=go-cache",
            "--config",
            &endpoint,
            "--config",
            &key_env,
            "--allow-env",
            KEY_VAR,
            "--allow-net",
            &grant,
        ],
        &[(KEY_VAR, "a2V5")],
    );
    assert!(caps["KnownCommands"].is_array(), "{caps}");
    let (status, _, stderr) = s.finish();
    assert!(status.success() && !stderr.contains("gocp"), "{stderr}");
}
