//! Keeps the benchmark working: `gocp-bench --quick` must run every part
//! against the real go command and Redis, and print a row with a finite value
//! for every figure of the table. It asserts nothing about the values: CI
//! machines are shared and noisy, and the figures to quote come from a full run.

use std::path::PathBuf;
use std::process::Command;

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
    let out = Command::new(&bench).arg("--quick").arg("--host").arg(&host).output().expect("running gocp-bench");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "gocp-bench --quick failed:\n{table}\n{}", String::from_utf8_lossy(&out.stderr));

    let rows: Vec<Vec<&str>> = table
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| figure"))
        .map(|l| l.trim_matches('|').split(" | ").map(str::trim).collect())
        .collect();
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
        assert!(rows.iter().any(|r| r[0].contains(figure)), "no row for {figure:?} in:\n{table}");
    }
    for row in &rows {
        assert_eq!(row.len(), 7, "a row without the table's seven columns: {row:?}");
        let value: f64 =
            row[3].parse().unwrap_or_else(|_| panic!("value {:?} of {:?} is not a number", row[3], row[0]));
        assert!(value.is_finite() && value > 0.0, "value {value} of {:?}", row[0]);
        assert!(["ok", "goal", "MISSED", "-"].contains(&row[6]), "verdict {:?} of {:?}", row[6], row[0]);
    }
}
