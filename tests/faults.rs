//! gocp-host killed with SIGKILL in the middle of real builds: nothing partial
//! or corrupt is ever served afterwards, and a binary linked from many cached
//! archives links, runs, and relinks identically from the cache.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

fn objects(state: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for shard in fs::read_dir(state.join("objects")).into_iter().flatten().flatten() {
        if shard.file_name().len() == 2 {
            out.extend(fs::read_dir(shard.path()).unwrap().flatten().map(|e| e.path()));
        }
    }
    out
}

/// The gocp-host processes serving `state` (found by their command line).
fn host_pids(state: &Path) -> Vec<u32> {
    let needle = state.to_str().unwrap();
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else { continue };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.starts_with(&*BIN) && cmdline.contains(needle) {
            pids.push(pid);
        }
    }
    pids
}

/// A go command whose output is not needed, only its outcome.
fn quiet_go(args: &[&str], gocache: &Path, prog: &str, dir: &Path) -> Command {
    let mut cmd = go_command(dir, gocache, Some(prog), args);
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    cmd
}

fn sha_file(path: &Path) -> [u8; 32] {
    sha256(&fs::read(path).unwrap())
}

#[test]
fn sigkill_mid_build_never_leaves_a_bad_object_and_cmd_go_relinks_identically() {
    require_go();
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let prog = format!("{BIN} --dir {}", state.display());

    // Kill gocp-host at two different points of a cold build of cmd/go.
    for (round, after_objects) in [(0, 20usize), (1, 120)] {
        let mut go = quiet_go(
            &["build", "-o", "/dev/null", "cmd/go"],
            &tmp.path().join(format!("gc-kill-{round}")),
            &prog,
            tmp.path(),
        )
        .spawn()
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(600);
        let mut killed = false;
        while Instant::now() < deadline {
            if go.try_wait().unwrap().is_some() {
                break;
            }
            if objects(&state).len() >= after_objects {
                for pid in host_pids(&state) {
                    Command::new("kill").args(["-9", &pid.to_string()]).output_within(COMMAND_LIMIT);
                    killed = true;
                }
                if killed {
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(killed, "round {round}: never saw {after_objects} objects to kill gocp-host at");
        wait_within(go, COMMAND_LIMIT, "go build after its helper was killed", Path::new("/dev/null"));
    }

    // Everything under a final name is whole and correct.
    let stored = objects(&state);
    assert!(stored.len() >= 120);
    for path in &stored {
        let name = path.file_name().unwrap().to_str().unwrap();
        assert_eq!(hex::encode(sha_file(path)), name, "{} does not hash to its name", path.display());
    }

    // A complete build, then a warm one from the cache alone: the binary
    // links, runs, and is identical.
    let first = tmp.path().join("go-first");
    let full =
        quiet_go(&["build", "-o", first.to_str().unwrap(), "cmd/go"], &tmp.path().join("gc-full"), &prog, tmp.path())
            .output_within(COMMAND_LIMIT);
    assert!(full.status.success(), "{}", text(&full.stderr));
    let second = tmp.path().join("go-second");
    let warm = quiet_go(
        &["build", "-x", "-o", second.to_str().unwrap(), "cmd/go"],
        &tmp.path().join("gc-warm"),
        &prog,
        tmp.path(),
    )
    .output_within(COMMAND_LIMIT);
    let warm_log = text(&warm.stderr);
    assert!(warm.status.success(), "{warm_log}");
    assert!(compile_steps(&warm_log).is_empty(), "warm build compiled:\n{}", compile_steps(&warm_log).join("\n"));
    assert_eq!(sha_file(&first), sha_file(&second), "relinked from the cache, the binary must be identical");
    let version = Command::new(&second).arg("version").output_within(COMMAND_LIMIT);
    assert!(version.status.success());
    assert!(text(&version.stdout).starts_with("go version go1."), "{}", text(&version.stdout));
}
