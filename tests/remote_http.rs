//! The built-in `http` plugin against real servers that speak the Bazel HTTP
//! remote-cache protocol, started by each test on 127.0.0.1: nginx (WebDAV
//! PUT with create_full_put_path, basic auth) and WsgiDAV (plain WebDAV: the
//! plugin makes the directories with MKCOL). First the scenarios every remote
//! plugin must pass, then what is particular to this one: the layout on the
//! server, upload dedup, the URL path as a namespace, bodies far larger
//! than the plugin's memory, and entries read while a plain WebDAV server
//! writes them.

mod support;

use std::fs;
use std::io::Read;

use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use support::remote::{self, Backend, Machine, RemoteServer, gocp_lines};
use support::servers::nginx::Nginx;
use support::servers::wsgidav::WsgiDav;
use support::*;

#[test]
fn nginx_two_machines_share_the_cache() {
    remote::shared_cache(&Nginx::start());
}

#[test]
fn nginx_stopped_mid_build() {
    remote::down_mid_build(&mut Nginx::start());
}

#[test]
fn nginx_wrong_credentials() {
    remote::bad_credentials(&Nginx::start());
}

#[test]
fn nginx_conformance() {
    remote::conformance(&Nginx::start());
}

#[test]
fn webdav_two_machines_share_the_cache() {
    remote::shared_cache(&WsgiDav::start());
}

#[test]
fn webdav_stopped_mid_build() {
    remote::down_mid_build(&mut WsgiDav::start());
}

#[test]
fn webdav_wrong_credentials() {
    remote::bad_credentials(&WsgiDav::start());
}

#[test]
fn webdav_conformance() {
    remote::conformance(&WsgiDav::start());
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
    assert!(!stderr.contains("gocp"), "gocp stays quiet: {stderr}");
    answer
}

fn hexs(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn entries_and_bodies_land_under_the_url_path_and_bodies_are_uploaded_once() {
    let server = Nginx::start();
    // The plugin's own layout, with bodies as the go command wrote them
    // (compressed ones are kept under the hash of what is sent: see below).
    let backend = server.backend().with(&["--compress", "none"]);
    let tmp = tempfile::tempdir().unwrap();
    let body: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let output = sha256(&body);

    // Machine A stores the body for one action; machine B, with its own local
    // store, produces the same body for another action.
    session(&backend, &tmp.path().join("a"), &[], |s| {
        s.send_put(1, &[1; 32], &body);
        s.recv()
    });
    session(&backend, &tmp.path().join("b"), &[], |s| {
        s.send_put(1, &[2; 32], &body);
        s.recv()
    });

    let data = server.data().join("gocp");
    assert_eq!(fs::read(data.join("cas").join(hexs(&output))).unwrap(), body, "the body is stored byte for byte");
    for action in [[1u8; 32], [2u8; 32]] {
        let line = fs::read_to_string(data.join("ac").join(hexs(&action))).unwrap();
        assert!(line.starts_with(&format!("v2 {} 300000 ", hexs(&output))), "entry line: {line:?}");
    }
    let log = server.access_log();
    let cas_path = format!("/gocp/cas/{}", hexs(&output));
    let puts = log.lines().filter(|l| l.contains(&format!("\"PUT {cas_path} "))).count();
    let heads = log.lines().filter(|l| l.contains(&format!("\"HEAD {cas_path} "))).count();
    assert_eq!(puts, 1, "B found the body on the server and did not upload it again:\n{log}");
    assert!(heads >= 2, "each machine asked before uploading:\n{log}");

    // Another URL path is another namespace: nothing of /gocp shows there.
    let other = server.backend_at("/another-team", "correct-horse").with(&["--compress", "none"]);
    let miss = session(&other, &tmp.path().join("c"), &[], |s| {
        s.send_get(1, &[1; 32]);
        s.recv()
    });
    assert_eq!(miss["Miss"], json!(true), "{miss}");
    // And the same path on a third machine is a hit fetched from the server.
    let hit = session(&backend, &tmp.path().join("d"), &[], |s| {
        s.send_get(1, &[1; 32]);
        s.recv()
    });
    assert_eq!(fs::read(hit["DiskPath"].as_str().unwrap_or_else(|| panic!("{hit}"))).unwrap(), body);
}

/// Fills buffers with the same pseudo-random bytes for the same seed.
struct Noise(u64);

impl Noise {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            chunk.copy_from_slice(&self.0.to_le_bytes()[..chunk.len()]);
        }
    }
}

#[test]
fn a_body_much_larger_than_the_plugins_memory_goes_up_and_comes_back() {
    const SIZE: u64 = 200 << 20;
    let server = Nginx::start();
    let backend = server.backend();
    let tmp = tempfile::tempdir().unwrap();
    // The plugin gets 32 MiB of memory: a body it buffered whole could not fit.
    let small = ["--plugin-memory", "32MiB"];

    let mut hasher = Sha256::new();
    let mut noise = Noise(0x9e37_79b9_7f4a_7c15);
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..SIZE >> 20 {
        noise.fill(&mut buf);
        hasher.update(&buf);
    }
    let output: [u8; 32] = hasher.finalize().into();

    session(&backend, &tmp.path().join("a"), &small, |s| {
        let mut noise = Noise(0x9e37_79b9_7f4a_7c15);
        s.send_put_streamed(1, &[9; 32], &output, SIZE, |b| noise.fill(b));
        s.recv()
    });
    let stored = server.data().join("gocp/cas").join(hexs(&output));
    assert_eq!(fs::metadata(&stored).map(|m| m.len()).ok(), Some(SIZE), "the whole body reached the server");

    let hit = session(&backend, &tmp.path().join("b"), &small, |s| {
        s.send_get(1, &[9; 32]);
        s.recv()
    });
    assert_eq!(hit["Size"], json!(SIZE), "{hit}");
    let mut file = fs::File::open(hit["DiskPath"].as_str().unwrap()).unwrap();
    let mut hasher = Sha256::new();
    loop {
        let n = file.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    assert_eq!(<[u8; 32]>::from(hasher.finalize()), output, "machine B got the same bytes back");
}

#[test]
fn a_hung_server_costs_a_build_seconds_and_one_line() {
    let server = Nginx::start();
    let mut backend = server.backend();
    backend.args.extend(["--config".to_string(), "timeout=1s".to_string()]);
    remote::hung_server(&backend, || server.freeze(), || server.thaw(), "timed out");
}

fn fails_to_start(args: &[&str], env: &[(&str, &str)]) -> String {
    remote::fails_to_start("http", args, env)
}

#[test]
fn configuration_mistakes_are_named_before_anything_is_served() {
    let e = fails_to_start(&[], &[]);
    assert!(e.contains("url is required"), "{e}");
    let e = fails_to_start(&["--config", "url=ftp://127.0.0.1:1/x"], &[]);
    assert!(e.contains("expected http or https"), "{e}");
    let e = fails_to_start(&["--config", "url=http://me:pw@127.0.0.1:1/x"], &[]);
    assert!(e.contains("basic-env") && !e.contains("pw"), "the password is never echoed: {e}");
    // A variable that is set but not granted is absent inside the plugin.
    let e = fails_to_start(&["--config", "url=http://127.0.0.1:1/x", "--config", "token-env=T"], &[("T", "secret")]);
    assert!(e.contains("set T and grant it with --allow-env T"), "{e}");
    let e = fails_to_start(
        &["--config", "url=http://127.0.0.1:1/x", "--config", "basic-env=B", "--allow-env", "B"],
        &[("B", "no-colon")],
    );
    assert!(e.contains("user:password"), "{e}");
    let e = fails_to_start(&["--config", "url=http://127.0.0.1:1/x", "--config", "timeout=soon"], &[]);
    assert!(e.contains("timeout=soon"), "{e}");
}

#[test]
fn starting_never_contacts_the_server() {
    // Nothing listens on this port: start-up still succeeds, and the first
    // call is where an unreachable server shows.
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("url=http://127.0.0.1:{port}/gocp");
    let grant = format!("127.0.0.1:{port}");
    let (s, caps) = Session::start(&[
        "--dir",
        dir.path().to_str().unwrap(),
        "--plugin",
        "http",
        "--config",
        &url,
        "--allow-net",
        &grant,
    ]);
    assert!(caps["KnownCommands"].is_array(), "{caps}");
    let (status, _, stderr) = s.finish();
    assert!(status.success() && !stderr.contains("gocp"), "{stderr}");
}

/// Every plugin instance makes the collections before its first upload, so on
/// a plain WebDAV server the instances of a busy first session race for the
/// same ones. WsgiDAV answers 500 to the loser when the collection appeared
/// between its check and its mkdir; that must cost nothing: no line for the
/// user, and every entry uploaded. The race is not certain in one session,
/// hence several, each in a namespace of its own, until the server's log
/// shows it happened (a MKCOL answered 500): a test of a race that did not
/// happen would prove nothing.
#[test]
fn webdav_instances_racing_to_make_the_collections_lose_no_upload() {
    let server = WsgiDav::start();
    let tmp = tempfile::tempdir().unwrap();
    let raced = |log: &str| log.lines().filter(|l| l.contains("\"MKCOL ") && l.contains("-> 500")).count();
    let mut rounds = 0u8;
    while rounds < 6 || (raced(&server.log()) == 0 && rounds < 30) {
        let round = rounds;
        rounds += 1;
        let backend = server.backend_at(&format!("/race{round}"), "correct-horse");
        session(&backend, &tmp.path().join(format!("machine{round}")), &["--instances", "8"], |s| {
            for i in 0..16u8 {
                s.send_put(i64::from(i) + 1, &[i + 1; 32], &[round, i]);
            }
            for _ in 0..16 {
                assert!(s.recv()["DiskPath"].is_string());
            }
            Value::Null
        });
        let entries = fs::read_dir(server.data().join(format!("race{round}/ac"))).map(|d| d.count()).unwrap_or(0);
        assert_eq!(entries, 16, "round {round}: every entry reached the server");
    }
    assert!(raced(&server.log()) > 0, "the race never happened in {rounds} rounds: the test proved nothing");
}

/// WsgiDAV, like Apache mod_dav, writes a PUT into the file it serves, so a
/// lookup that meets the upload of the same entry (another machine's, or this
/// build's own after an early miss) reads it empty. That is an entry not
/// stored yet: a miss without a word to the user, and the put that follows
/// fills it for the next machine.
#[test]
fn webdav_an_entry_read_while_it_is_written_is_a_quiet_miss() {
    let server = WsgiDav::start();
    let backend = server.backend();
    let tmp = tempfile::tempdir().unwrap();
    let ac = server.data().join("gocp/ac");
    fs::create_dir_all(&ac).unwrap();
    fs::create_dir_all(server.data().join("gocp/cas")).unwrap();
    fs::write(ac.join(hexs(&[5; 32])), b"").unwrap();

    let miss = session(&backend, &tmp.path().join("a"), &[], |s| {
        s.send_get(1, &[5; 32]);
        let miss = s.recv();
        s.send_put(2, &[5; 32], b"built after the miss");
        s.recv();
        miss
    });
    assert_eq!(miss["Miss"], json!(true), "{miss}");
    let hit = session(&backend, &tmp.path().join("b"), &[], |s| {
        s.send_get(1, &[5; 32]);
        s.recv()
    });
    let path = hit["DiskPath"].as_str().unwrap_or_else(|| panic!("the put filled the entry: {hit}"));
    assert_eq!(fs::read(path).unwrap(), b"built after the miss");
}

#[test]
fn stalled_bodies_pause_the_plugin() {
    remote::stalled_bodies(&Nginx::start());
}

#[test]
fn read_only_builds_write_nothing_and_read_what_trusted_builds_signed() {
    remote::read_only_and_signed(&Nginx::start());
}

/// A fork's job has no secrets: against a cache that serves reads to
/// anyone, the http plugin without credentials, read-only and trusting the
/// team's key, compiles nothing that a trusted build signed.
#[test]
fn a_build_without_credentials_reads_what_trusted_builds_signed() {
    require_go();
    let server = Nginx::start_public_reads();
    let tmp = tempfile::tempdir().unwrap();
    let (private, public) = remote::keygen(&tmp.path().join("keys"));
    let trusted = Machine::new(&tmp.path().join("trusted"));
    let src = tmp.path().join("src");
    write_module(&src);
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
    assert_eq!(compile_steps(&text(&out.stderr)), Vec::<&str>::new());
    assert_eq!(gocp_lines(&out.stderr), Vec::<String>::new());
    assert_eq!(server.stored(), stored);
}

/// Connections nginx served `lines` on, as its `conn=N` field says.
fn connections(lines: &[&str]) -> std::collections::HashSet<String> {
    lines.iter().filter_map(|l| l.rsplit_once(" conn=").map(|(_, c)| c.to_string())).collect()
}

fn is_zstd(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0x28, 0xb5, 0x2f, 0xfd])
}

#[test]
fn requests_share_connections_and_bodies_travel_compressed_and_come_back_whole() {
    let server = Nginx::start();
    let backend = server.backend();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_module(&src);

    // A builds and tests: every output goes up, compressed (the default for a
    // plugin that reaches the network).
    let a = Machine::new(&tmp.path().join("a"));
    a.run(&backend, &src, &["build", "-trimpath", "./..."]);
    let stats = a.stats();
    let log = server.access_log();
    let lines: Vec<&str> = log.lines().collect();
    let conns = connections(&lines);
    assert!(lines.len() >= 20, "{log}");
    assert!(conns.len() * 4 <= lines.len(), "{} connections for {} requests:\n{log}", conns.len(), lines.len());
    assert_eq!(stats["http_requests"], json!(lines.len()), "gocp counts what the server saw: {stats}");
    assert_eq!(stats["http_connections"], json!(conns.len()), "{stats}");
    let (up, raw) = (stats["remote_bytes_up"].as_u64().unwrap(), stats["put_bytes"].as_u64().unwrap());
    assert!(up > 0 && up * 2 < raw, "Go outputs compress: {up} bytes sent for {raw}: {stats}");
    let cas = files_under(&server.data().join("gocp/cas"));
    let compressed = cas.iter().filter(|p| is_zstd(&fs::read(p).unwrap())).count();
    assert!(compressed > 0, "{cas:?}");
    for path in &cas {
        let name = path.file_name().unwrap().to_str().unwrap();
        assert_eq!(name, hexs(&sha256(&fs::read(path).unwrap())), "a CAS keeps each blob under its own hash");
    }

    // B, with an empty local store, builds from it, logging every request.
    let b = Machine::new(&tmp.path().join("b"));
    let requests = tmp.path().join("requests.jsonl");
    let logging = backend.with(&["--log-requests", requests.to_str().unwrap()]);
    let out = b.run(&logging, &src, &["build", "-x", "-trimpath", "./..."]);
    assert_eq!(compile_steps(&text(&out.stderr)), Vec::<&str>::new(), "B compiled nothing");
    let stats = b.stats();
    assert_eq!(stats["rejected_bodies"], json!(0), "{stats}");
    let down = stats["remote_bytes_down"].as_u64().unwrap();
    assert!(down > 0 && down * 2 < stats["hit_bytes"].as_u64().unwrap(), "{stats}");
    let logged: Vec<Value> =
        fs::read_to_string(&requests).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let gets: Vec<&Value> = logged.iter().filter(|l| l["command"] == "get").collect();
    assert_eq!(json!(gets.len()), stats["gets"], "a line per get");
    assert_eq!(json!(gets.iter().filter(|l| l["result"] == "hit").count()), stats["hits"]);
    assert!(gets.iter().all(|l| l["ms"].as_f64().is_some() && l["action"].as_str().is_some_and(|a| a.len() == 64)));
    let fetched: u64 =
        gets.iter().filter(|l| l["from"] == "fetched").map(|l| l["remote_bytes"].as_u64().unwrap()).sum();
    assert!(fetched <= down, "{fetched} > {down}");
    assert!(gets.iter().any(|l| l["from"] == "local" || l["from"] == "fetched"), "{logged:?}");
    assert_eq!(json!(logged.iter().filter(|l| l["command"] == "put").count()), stats["puts"]);

    // Entries written without compression, as an older gocp wrote them, read
    // the same through a gocp that compresses.
    let plain = server.backend_at("/plain", "correct-horse");
    let c = Machine::new(&tmp.path().join("c"));
    c.run(&plain.with(&["--compress", "none"]), &src, &["build", "-trimpath", "./..."]);
    assert!(!files_under(&server.data().join("plain/cas")).iter().any(|p| is_zstd(&fs::read(p).unwrap())));
    let d = Machine::new(&tmp.path().join("d"));
    let out = d.run(&plain, &src, &["build", "-x", "-trimpath", "./..."]);
    assert_eq!(compile_steps(&text(&out.stderr)), Vec::<&str>::new(), "old entries served");

    // Whoever damages the compressed bodies on the server costs E its hits,
    // never a wrong output: each is rejected, counted, and said once.
    for path in cas.iter().filter(|p| is_zstd(&fs::read(p).unwrap())) {
        let mut bytes = fs::read(path).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x5a;
        bytes[5] ^= 0x5a;
        fs::write(path, bytes).unwrap();
    }
    let e = Machine::new(&tmp.path().join("e"));
    let out = e.run(&backend, &src, &["build", "-trimpath", "./..."]);
    let stats = e.stats();
    assert!(stats["rejected_bodies"].as_u64().unwrap() > 0, "{stats}");
    let lines = gocp_lines(&out.stderr);
    assert!(lines.len() == 1 && lines[0].contains("rejected a body"), "{lines:?}");
}

/// A CA and a certificate it signed for 127.0.0.1, as PEM files in `dir`:
/// (CA certificate, server certificate, server key).
fn private_ca(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(rcgen::DnType::CommonName, "gocp test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    let server_cert = server.signed_by(&server_key, &issuer).unwrap();
    let paths = (dir.join("ca.pem"), dir.join("server.pem"), dir.join("server.key"));
    fs::write(&paths.0, ca_cert.pem()).unwrap();
    fs::write(&paths.1, server_cert.pem()).unwrap();
    fs::write(&paths.2, server_key.serialize_pem()).unwrap();
    paths
}

#[test]
fn https_with_a_private_ca_is_trusted_when_given_and_says_what_to_change_when_not() {
    let tmp = tempfile::tempdir().unwrap();
    let (ca, certificate, key) = private_ca(tmp.path());
    let server = Nginx::start_tls(&certificate, &key);
    let plain = server.backend();
    let backend = Backend {
        args: plain.args.iter().map(|a| a.replace("url=http://", "url=https://")).collect(),
        env: plain.env.clone(),
    };
    let src = tmp.path().join("src");
    write_module(&src);

    // Not given the CA: the build goes on, without the cache, and gocp says
    // once what to change.
    let untrusting = Machine::new(&tmp.path().join("untrusting"));
    let out = untrusting.run(&backend, &src, &["build", "./..."]);
    let lines = gocp_lines(&out.stderr);
    assert!(lines.len() == 1 && lines[0].contains("--ca-file"), "{lines:?}");
    assert!(untrusting.stats()["plugin_errors"].as_u64().unwrap() > 0);
    assert_eq!(server.stored(), 0);

    // Given it: A fills the cache over HTTPS, and B builds from it.
    let trusting = backend.with(&["--ca-file", ca.to_str().unwrap()]);
    let a = Machine::new(&tmp.path().join("a"));
    let out = a.run(&trusting, &src, &["build", "-trimpath", "./..."]);
    assert_eq!(gocp_lines(&out.stderr), Vec::<String>::new());
    assert!(server.stored() > 0);
    let b = Machine::new(&tmp.path().join("b"));
    let out = b.run(&trusting, &src, &["build", "-x", "-trimpath", "./..."]);
    assert_eq!(compile_steps(&text(&out.stderr)), Vec::<&str>::new(), "B built from the HTTPS cache");

    // The system's store as SSL_CERT_FILE names it counts too.
    let c = Machine::new(&tmp.path().join("c"));
    let mut cmd = c.go(&backend, &src, &["build", "-x", "-trimpath", "./..."]);
    cmd.env("SSL_CERT_FILE", &ca);
    let out = cmd.output_within(COMMAND_LIMIT);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(compile_steps(&text(&out.stderr)), Vec::<&str>::new(), "trusted through SSL_CERT_FILE");

    // A file that holds no certificate is a mistake named at the start.
    let e = remote::fails_to_start(
        "http",
        &["--config", "url=https://127.0.0.1:1/x", "--ca-file", key.to_str().unwrap()],
        &[],
    );
    assert!(e.contains("--ca-file") && e.contains("server.key"), "{e}");
}
