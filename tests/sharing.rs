//! Sharing a cache safely: what someone who can write to the store can do to
//! the builds that read it, with and without signed entries; pull requests
//! and key rotation; keys that never reach a plugin; and plugins built for
//! the previous contract. Against a shared directory (the disk plugin) and a
//! real Redis; each remote plugin's read-only scenario is in its own file.

mod support;

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::json;
use support::remote::{Backend, Machine, RemoteServer, gocp_lines, keygen};
use support::servers::redis::Redis;
use support::*;

/// The disk plugin on a directory shared by every machine.
fn shared_dir(dir: &Path) -> Backend {
    let grant = format!("{}:/shared", dir.display());
    Backend { args: ["--allow-dir", &grant, "--config", "path=/shared"].map(String::from).to_vec(), env: Vec::new() }
}

/// The command the tests build, and the bytes of it built with the builtin
/// cache from scratch: what every build through a poisoned cache must match.
const TOOL: &[&str] = &["build", "-trimpath", "-o", "tool.bin", "./cmd/tool"];

fn clean_tool(root: &Path) -> Vec<u8> {
    let src = root.join("clean-src");
    write_module(&src);
    let out = go(&src, &root.join("clean-gocache"), None, TOOL);
    assert!(out.status.success(), "{}", text(&out.stderr));
    fs::read(src.join("tool.bin")).unwrap()
}

/// What a machine gets building the tool through `backend` from a fresh
/// checkout: the binary if the build succeeded, and what the build printed.
fn build_tool(machine: &Machine, backend: &Backend, src: &Path) -> (Option<Vec<u8>>, String) {
    write_module(src);
    let out = machine.go(backend, src, TOOL).output_within(COMMAND_LIMIT);
    let binary = out.status.success().then(|| fs::read(src.join("tool.bin")).unwrap());
    (binary, text(&out.stderr))
}

/// Every entry rotated one place along: each still a well-formed entry, with
/// its signature if it had one, now answering for another action.
fn rotate<T: Clone>(values: &mut [T]) {
    values.rotate_left(1);
}

/// Rotates the contents of the entry files under a shared directory.
fn rotate_entry_files(dir: &Path) {
    let files = files_under(&dir.join("entries"));
    let mut contents: Vec<Vec<u8>> = files.iter().map(|f| fs::read(f).unwrap()).collect();
    assert!(contents.len() > 10, "entries to poison: {}", contents.len());
    rotate(&mut contents);
    for (file, content) in files.iter().zip(contents) {
        fs::write(file, content).unwrap();
    }
}

/// Rotates the values of the entry keys on a Redis server.
fn rotate_redis_entries(redis: &Redis) {
    let keys = redis.keys("gocp/ac/*");
    let mut values: Vec<String> = keys.iter().map(|k| redis.cli(&["GET", k])).collect();
    assert!(values.len() > 10, "entries to poison: {}", values.len());
    rotate(&mut values);
    for (key, value) in keys.iter().zip(values) {
        redis.cli(&["SET", key, &value]);
    }
}

/// The attack, without signatures and with: machine A builds and stores,
/// the attacker rotates the stored entries, machine B builds.
fn poisoning(root: &Path, backend: &Backend, poison: &dyn Fn()) {
    let clean = clean_tool(root);
    // Unsigned: B links what the attacker pointed it at, or fails.
    let a = Machine::new(&root.join("a"));
    let (built, _) = build_tool(&a, backend, &root.join("a/src"));
    assert_eq!(built.as_deref(), Some(clean.as_slice()), "A built the tool");
    poison();
    let b = Machine::new(&root.join("b"));
    let (built, printed) = build_tool(&b, backend, &root.join("b/src"));
    assert!(built.as_deref() != Some(clean.as_slice()), "the attack should work on unsigned entries: {printed}");
    eprintln!("unsigned, poisoned: the build {}", if built.is_some() { "linked another binary" } else { "failed" });

    // Signed, and B trusting only the key: every forged entry (and manifest
    // pointer) is a miss, counted, and B's binary is the clean one.
    let (private, public) = keygen(&root.join("keys"));
    let signing = backend.with(&["--sign-key", private.to_str().unwrap()]);
    let trusting = backend.with(&["--trust-key", public.to_str().unwrap()]);
    let a2 = Machine::new(&root.join("a2"));
    let (built, _) = build_tool(&a2, &signing, &root.join("a2/src"));
    assert_eq!(built.as_deref(), Some(clean.as_slice()));
    poison();
    let b2 = Machine::new(&root.join("b2"));
    let src = root.join("b2/src");
    write_module(&src);
    let out = b2.go(&trusting, &src, TOOL).output_within(COMMAND_LIMIT);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(fs::read(src.join("tool.bin")).unwrap(), clean, "byte for byte the clean build");
    let stats = b2.stats();
    assert!(stats["untrusted_entries"].as_u64().unwrap() > 0, "the forged entries were seen and counted: {stats}");
    let lines = gocp_lines(&out.stderr);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("not signed by a trusted key"), "{}", lines[0]);
}

#[test]
fn a_writer_to_a_shared_directory_cannot_poison_signed_builds() {
    require_go();
    let tmp = tempfile::tempdir().unwrap();
    let shared = tmp.path().join("shared");
    fs::create_dir_all(&shared).unwrap();
    poisoning(tmp.path(), &shared_dir(&shared), &|| rotate_entry_files(&shared));
}

#[test]
fn a_writer_to_a_redis_cache_cannot_poison_signed_builds() {
    require_go();
    let redis = Redis::start();
    let tmp = tempfile::tempdir().unwrap();
    poisoning(tmp.path(), &redis.backend(), &|| rotate_redis_entries(&redis));
}

#[test]
fn a_pull_request_signing_with_its_own_key_cannot_hide_the_trusted_entries() {
    require_go();
    let redis = Redis::start();
    let tmp = tempfile::tempdir().unwrap();
    let (main_key, main_pub) = keygen(&tmp.path().join("main-keys"));
    let (pr_key, _) = keygen(&tmp.path().join("pr-keys"));
    let backend = redis.backend();
    let trusted = backend.with(&["--sign-key", main_key.to_str().unwrap()]);
    let main = Machine::new(&tmp.path().join("main"));
    let src = tmp.path().join("main/src");
    write_module(&src);
    main.run(&trusted, &src, &["build", "-trimpath", "./..."]);
    let after_main = redis.stored();

    // The pull request changes a package and builds with its own key.
    let pr = Machine::new(&tmp.path().join("pr"));
    let pr_src = tmp.path().join("pr/src");
    write_module(&pr_src);
    fs::write(pr_src.join("mathx/extra.go"), "package mathx\n\nfunc Twice(x int) int { return 2 * x }\n").unwrap();
    let pr_backend = backend.with(&["--sign-key", pr_key.to_str().unwrap(), "--trust-key", main_pub.to_str().unwrap()]);
    pr.run(&pr_backend, &pr_src, &["build", "-trimpath", "./..."]);
    assert!(redis.stored() > after_main, "the pull request wrote its own entries");

    let next = Machine::new(&tmp.path().join("next"));
    let next_src = tmp.path().join("next/src");
    write_module(&next_src);
    let reader = backend.with(&["--trust-key", main_pub.to_str().unwrap()]);
    let out = next.run(&reader, &next_src, &["build", "-x", "-trimpath", "./..."]);
    assert_eq!(compile_steps(&text(&out.stderr)), Vec::<&str>::new(), "the trusted entries are all still hits");
}

#[test]
fn keys_rotate_without_losing_the_entries_of_the_old_one() {
    require_go();
    let tmp = tempfile::tempdir().unwrap();
    let shared = tmp.path().join("shared");
    fs::create_dir_all(&shared).unwrap();
    let backend = shared_dir(&shared);
    let (old, old_pub) = keygen(&tmp.path().join("old"));
    let (new, new_pub) = keygen(&tmp.path().join("new"));
    let a = Machine::new(&tmp.path().join("a"));
    let src = tmp.path().join("a/src");
    write_module(&src);
    a.run(&backend.with(&["--sign-key", old.to_str().unwrap()]), &src, &["build", "-trimpath", "./..."]);

    // Both keys trusted, the new one signing: the old entries are hits, and
    // what is built anew is signed with the new key.
    let both = ["--trust-key", old_pub.to_str().unwrap(), "--trust-key", new_pub.to_str().unwrap()];
    let rotating = backend.with(&both).with(&["--sign-key", new.to_str().unwrap()]);
    let b = Machine::new(&tmp.path().join("b"));
    let src_b = tmp.path().join("b/src");
    write_module(&src_b);
    let out = b.run(&rotating, &src_b, &["build", "-x", "-trimpath", "./..."]);
    assert_eq!(compile_steps(&text(&out.stderr)), Vec::<&str>::new(), "signed with the old key, still trusted");
    fs::write(src_b.join("textx/extra.go"), "package textx\n\nfunc Nothing() {}\n").unwrap();
    b.run(&rotating, &src_b, &["build", "-trimpath", "./..."]);

    // Only the new key from now on: the change is a hit, what only the old
    // key signed is not used any more.
    let c = Machine::new(&tmp.path().join("c"));
    let src_c = tmp.path().join("c/src");
    write_module(&src_c);
    fs::write(src_c.join("textx/extra.go"), "package textx\n\nfunc Nothing() {}\n").unwrap();
    let new_only = backend.with(&["--trust-key", new_pub.to_str().unwrap()]);
    let out = c.run(&new_only, &src_c, &["build", "-x", "-trimpath", "./..."]);
    let compiled = compile_steps(&text(&out.stderr)).len();
    assert!(compiled > 0, "what only the old key signed is rebuilt");
    let out = c.run(&new_only, &src_c, &["build", "-x", "-trimpath", "./..."]);
    assert_eq!(compile_steps(&text(&out.stderr)), Vec::<&str>::new());
}

#[test]
fn keygen_writes_a_private_key_only_its_owner_can_read() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(BIN).args(["keygen", "--out"]).arg(tmp.path()).output_within(COMMAND_LIMIT);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let public = fs::read_to_string(tmp.path().join("signing.pub")).unwrap();
    assert!(public.starts_with("gocp-ed25519:"), "{public}");
    assert_eq!(text(&out.stdout).trim(), public.trim(), "the public key is printed for --trust-key");
    let private = tmp.path().join("signing.key");
    assert_eq!(fs::metadata(&private).unwrap().permissions().mode() & 0o777, 0o600);
    let again = Command::new(BIN).args(["keygen", "--out"]).arg(tmp.path()).output_within(COMMAND_LIMIT);
    assert_eq!(again.status.code(), Some(2), "an existing key is never overwritten");

    // Mistakes are named at start, in one line, before anything is served.
    let state = tempfile::tempdir().unwrap();
    let d = state.path().to_str().unwrap();
    fs::set_permissions(&private, fs::Permissions::from_mode(0o644)).unwrap();
    let fails = |args: &[&str], env: &[(&str, &str)]| {
        let out =
            Command::new(BIN).args(args).envs(env.iter().copied()).stdin(Stdio::null()).output_within(COMMAND_LIMIT);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out.stderr));
        assert_eq!(text(&out.stderr).lines().count(), 1, "{}", text(&out.stderr));
        text(&out.stderr)
    };
    assert!(fails(&["--dir", d, "--sign-key", private.to_str().unwrap()], &[]).contains("chmod 600"));
    fs::set_permissions(&private, fs::Permissions::from_mode(0o600)).unwrap();
    assert!(fails(&["--dir", d, "--trust-key", "gocp-ed25519:not-a-key"], &[]).contains("--trust-key"));
    assert!(fails(&["--dir", d, "--trust-key", "/no/such/key.pub"], &[]).contains("--trust-key /no/such/key.pub"));
    let secret = fs::read_to_string(&private).unwrap();
    let both = fails(&["--dir", d, "--sign-key", private.to_str().unwrap()], &[("GOCP_SIGN_KEY", secret.trim())]);
    assert!(both.contains("one way"), "{both}");
}

#[test]
fn the_signing_key_never_reaches_the_plugin() {
    let tmp = tempfile::tempdir().unwrap();
    let (private, _) = keygen(&tmp.path().join("keys"));
    let secret = fs::read_to_string(&private).unwrap().trim().to_string();
    let seed = secret.trim_start_matches("gocp-ed25519-private:").to_string();
    let state = tmp.path().join("state");
    let granted = tmp.path().join("granted");
    fs::create_dir_all(&granted).unwrap();
    fs::write(granted.join("note.txt"), "a file the plugin may read").unwrap();
    let hostile = test_plugin("hostile");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> =
            ["--dir", state.to_str().unwrap(), "--plugin", hostile.to_str().unwrap()].map(String::from).to_vec();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    // The key in the variable CI secrets arrive in, and a plugin that looks
    // at everything it was given: its variables and directories.
    let observe = args(&[
        "--config",
        "attack=observe",
        "--allow-env",
        "HOME",
        "--allow-dir",
        &format!("{}:/granted", granted.display()),
    ]);
    let observe: Vec<&str> = observe.iter().map(String::as_str).collect();
    let (mut s, _) = Session::start_env(&observe, &[("GOCP_SIGN_KEY", &secret)]);
    s.send_put(1, &[1; 32], b"signed on its way to the plugin");
    assert!(s.recv()["DiskPath"].is_string());
    s.send_close(2);
    s.recv();
    let (status, _, stderr) = s.finish();
    assert!(status.success(), "{stderr}");
    let report = fs::read_to_string(state.join("plugins/hostile/report")).unwrap();
    assert!(report.contains("observe-env: ALLOWED") && report.contains("note.txt"), "{report}");
    assert!(!report.contains(&seed), "the plugin saw the signing key:\n{report}");

    // Granting what holds the key is refused, in one line.
    let refused = |extra: &[&str], env: &[(&str, &str)]| {
        let a = args(extra);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let out =
            Command::new(BIN).args(&a).envs(env.iter().copied()).stdin(Stdio::null()).output_within(COMMAND_LIMIT);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {}", text(&out.stderr));
        text(&out.stderr)
    };
    let e = refused(&["--allow-env", "GOCP_SIGN_KEY"], &[("GOCP_SIGN_KEY", &secret)]);
    assert!(e.contains("would hand the signing key to the plugin"), "{e}");
    let keys_dir = format!("{}:/keys", tmp.path().join("keys").display());
    let e = refused(&["--sign-key", private.to_str().unwrap(), "--allow-dir", &keys_dir], &[]);
    assert!(e.contains("holds the signing key"), "{e}");
    let e = refused(&["--config", &format!("attack=none{secret}")], &[("GOCP_SIGN_KEY", &secret)]);
    assert!(e.contains("holds the signing key"), "{e}");
}

#[test]
fn a_plugin_of_the_previous_contract_serves_but_cannot_carry_signatures() {
    let tmp = tempfile::tempdir().unwrap();
    let old = test_plugin("old-contract");
    let d = tmp.path().join("state");
    let d = d.to_str().unwrap();
    let p = old.to_str().unwrap();
    let table = run_host(&["--dir", d, "plugin-test", p]);
    assert!(table.status.success(), "{}{}", text(&table.stdout), text(&table.stderr));
    assert!(text(&table.stdout).contains("(gocp:cache@0.1.0)"), "{}", text(&table.stdout));

    let (mut s, _) = Session::start(&["--dir", d, "--plugin", p]);
    s.send_put(1, &[4; 32], b"kept as before");
    assert!(s.recv()["DiskPath"].is_string());
    s.send_get(2, &[4; 32]);
    assert_eq!(s.recv()["Size"], json!(14));
    s.send_close(3);
    s.recv();
    let (status, _, stderr) = s.finish();
    assert!(status.success() && stderr.is_empty(), "{stderr}");

    let (_, public) = keygen(&tmp.path().join("keys"));
    let out = run_host(&["--dir", d, "--plugin", p, "--trust-key", public.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let e = text(&out.stderr);
    assert!(e.contains("gocp:cache@0.1.0") && e.contains("gocp:cache@0.2.0"), "{e}");
}
