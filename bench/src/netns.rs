//! The benchmark's own network namespace, for counting bytes on the wire
//! independently of every helper: the benchmark re-executes itself inside a
//! new network namespace (`unshare --net`, with `--map-root-user` when not
//! root) whose loopback carries nothing but the benchmark's own traffic, and
//! reads that loopback's byte counter.
//!
//! It owns only that. It never starts a server, never measures a build, and
//! never invents a figure: outside such a namespace [`lo_bytes`] is `None`.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, ensure};

/// Set in the environment of the benchmark re-executed inside the namespace.
const INSIDE: &str = "GOCP_BENCH_NETNS";

/// Whether this process runs in the namespace the benchmark made.
pub fn inside() -> bool {
    std::env::var_os(INSIDE).is_some_and(|v| v == "1")
}

/// `unshare`'s arguments for a new network namespace: a user namespace too
/// unless this process is root (then it needs none, and files keep their owner).
fn unshare_args() -> Vec<&'static str> {
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Uid:")).map(|u| u.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false);
    if root { vec!["--net"] } else { vec!["--net", "--map-root-user"] }
}

/// Replaces this process with the same benchmark, same arguments, inside a
/// new network namespace. Returns only when that is impossible here, with
/// the reason (checked first by bringing a namespace's loopback up, since an
/// exec that then failed would leave nothing to fall back to).
pub fn reexec() -> String {
    let probe = Command::new("unshare")
        .args(unshare_args())
        .args(["ip", "link", "set", "lo", "up"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .output();
    match probe {
        Err(e) => return format!("unshare could not run: {e}"),
        Ok(out) if !out.status.success() => {
            return format!(
                "`unshare {} ip link set lo up` failed: {}",
                unshare_args().join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(_) => {}
    }
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => return format!("cannot find the benchmark's own executable: {e}"),
    };
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let err = Command::new("unshare").args(unshare_args()).arg("--").arg(exe).args(args).env(INSIDE, "1").exec();
    format!("exec unshare failed: {err}")
}

/// Inside the namespace: brings its loopback up (it starts down).
pub fn setup() -> Result<()> {
    let out = Command::new("ip").args(["link", "set", "lo", "up"]).output().context("running ip")?;
    ensure!(out.status.success(), "ip link set lo up: {}", String::from_utf8_lossy(&out.stderr).trim());
    ensure!(lo_bytes().is_some(), "no lo in /proc/self/net/dev");
    Ok(())
}

/// Bytes the namespace's loopback has sent so far (each byte handed to
/// `lo` is counted once here and once in its receive counter), or `None`
/// outside the benchmark's namespace, where other traffic crosses `lo` too.
///
/// Read from /proc/self/net/dev, which shows the reading process's network
/// namespace; /sys/class/net/lo/statistics would show the namespace of
/// whoever mounted /sys (the machine's), not this one.
pub fn lo_bytes() -> Option<u64> {
    if !inside() {
        return None;
    }
    let dev = std::fs::read_to_string("/proc/self/net/dev").ok()?;
    let line = dev.lines().find_map(|l| l.trim_start().strip_prefix("lo:"))?;
    // receive: bytes packets errs drop fifo frame compressed multicast; transmit: bytes ...
    line.split_whitespace().nth(8)?.parse().ok()
}
