//! Keeps the benchmark working: `gocp-bench --quick` must run every part
//! against the real go command and real servers, print a row with a finite
//! value for every figure of the main table, and print the remote part's
//! table over an emulated link (the LAN profile, gocp's rows and the builtin
//! cache; the other helpers are left out here, since building them takes
//! minutes). It asserts nothing about the values: CI machines are shared and
//! noisy, and the figures to quote come from a full run.

use std::path::PathBuf;
use std::process::Command;

/// The tables of the output: runs of lines starting with `|`, each split
/// into rows of trimmed cells, the header first.
fn tables(out: &str) -> Vec<Vec<Vec<&str>>> {
    let mut tables: Vec<Vec<Vec<&str>>> = Vec::new();
    let mut in_table = false;
    for line in out.lines() {
        if line.starts_with('|') {
            if !in_table {
                tables.push(Vec::new());
                in_table = true;
            }
            if !line.starts_with("|---") {
                tables.last_mut().unwrap().push(line.trim_matches('|').split(" | ").map(str::trim).collect());
            }
        } else {
            in_table = false;
        }
    }
    tables
}

#[test]
fn a_quick_run_prints_every_figure() {
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_gocp-bench"));
    // `cargo test --release` from the workspace root builds gocp-host beside
    // gocp-bench (the host's own tests need it).
    let host = bench.with_file_name("gocp-host");
    assert!(
        host.is_file(),
        "{} is missing: run `cargo test --release` from the workspace root, which builds it",
        host.display()
    );
    let out = Command::new(&bench)
        .args(["--quick", "--link", "lan", "--no-peers", "--host"])
        .arg(&host)
        .output()
        .expect("running gocp-bench");
    let text = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "gocp-bench --quick failed:\n{text}\n{stderr}");
    let tables = tables(&text);

    let main = tables.iter().find(|t| t[0][0] == "figure").unwrap_or_else(|| panic!("no main table in:\n{text}"));
    let rows = &main[1..];
    for figure in [
        "warm go build",
        "minimal GOCACHEPROG helper",
        "cold go build",
        "disk after cold go build",
        "spawn to first get answered",
        "pipelined small gets",
        "pipelined small puts",
        "peak host RSS",
        "from the remote, empty local store",
        "restored by a local copy",
        "remote down",
        "uploading to redis",
    ] {
        assert!(rows.iter().any(|r| r[0].contains(figure)), "no row for {figure:?} in:\n{text}");
    }
    for row in rows {
        assert_eq!(row.len(), 7, "a row without the table's seven columns: {row:?}");
        let value: f64 =
            row[3].parse().unwrap_or_else(|_| panic!("value {:?} of {:?} is not a number", row[3], row[0]));
        assert!(value.is_finite() && value > 0.0, "value {value} of {:?}", row[0]);
        assert!(["ok", "goal", "MISSED", "-"].contains(&row[6]), "verdict {:?} of {:?}", row[6], row[0]);
    }

    // The remote part over the LAN link: the builtin cache and gocp's plugins
    // whose servers .ci/tools installs, each measured (none failed).
    assert!(text.contains("over an emulated link, LAN"), "no LAN table in:\n{text}");
    let link = tables
        .iter()
        .find(|t| t[0][0] == "helper, server")
        .unwrap_or_else(|| panic!("no table of the remote part over a link in:\n{text}\n{stderr}"));
    assert_eq!(link[0].len(), 6, "the link table's header: {:?}", link[0]);
    for name in ["builtin cache", "gocp s3", "gocp redis", "gocp gcs", "gocp azure"] {
        assert!(link.iter().any(|r| r[0].starts_with(name)), "no row for {name:?} in:\n{text}\n{stderr}");
    }
    for row in &link[1..] {
        assert_eq!(row.len(), 6, "a row without the link table's six columns: {row:?}");
        assert!(!row[1].starts_with("failed"), "a row failed: {row:?}\n{stderr}");
        let ratio: f64 = row[1].split(' ').next().unwrap().parse().unwrap_or_else(|_| panic!("cold ratio of {row:?}"));
        assert!(ratio.is_finite() && ratio > 0.0, "cold ratio of {row:?}");
        let warm: f64 = row[2].trim_end_matches(" s").parse().unwrap_or_else(|_| panic!("warm seconds of {row:?}"));
        assert!(warm.is_finite() && warm > 0.0, "warm seconds of {row:?}");
        row[3].parse::<usize>().unwrap_or_else(|_| panic!("B compiles of {row:?}"));
        for wire in &row[4..] {
            // A ratio with the bytes, unknown outside a namespace, "-" for the builtin cache.
            let ok = *wire == "-" || *wire == "unknown" || wire.split(' ').next().unwrap().parse::<f64>().is_ok();
            assert!(ok, "wire bytes {wire:?} of {row:?}");
        }
    }
    for name in ["gocp s3", "gocp redis", "gocp gcs", "gocp azure"] {
        let line = text.lines().find(|l| l.trim_start().starts_with(name) && l.contains("A: hits_local"));
        assert!(line.is_some(), "no --stats-json line for {name:?} in:\n{text}");
    }
}
