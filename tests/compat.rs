//! The compatibility suite: Go toolchains, the go command's subcommands and the
//! tools teams run over real module graphs, each once with the go command's
//! builtin cache and twice through gocp (cold, then warm: a new GOCACHE over
//! the same state directory), with the same results all three times and a warm
//! run that rebuilds nothing; and one large real-world module built cold on one
//! machine and warm on another through a Redis server.
//!
//! Toolchains and modules come from the Go module proxy into a GOPATH of the
//! suite's own under the tools directory (the tools themselves come from
//! `.ci/tools/go-tools.sh`), so a second run downloads nothing; every build
//! runs with GOPROXY=off.

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;
use support::remote::{Machine, RemoteServer, gocp_lines};
use support::servers::redis::Redis;
use support::*;

/// The newest patch release of each minor that the Go module proxy served
/// on 2026-11-29 (`go list -m -versions golang.org/toolchain`).
const TOOLCHAINS: [&str; 4] = ["go1.24.13", "go1.25.14", "go1.26.11", "go1.27.4"];

/// The toolchain of every case but the other toolchains' own (which run the
/// core of the suite, see [`toolchain`]): pinned, so that what the suite
/// checks does not depend on the go that happens to be on PATH.
const MAIN_TOOLCHAIN: &str = TOOLCHAINS[2];

/// Caddy: about 1,000 packages (50 of its own, 745 from 159 other modules,
/// 230 of the standard library); a cold build takes about two minutes on a
/// quiet two-core machine, four on a busy one.
const LARGE_MODULE: &str = "github.com/caddyserver/caddy/v2@v2.11.9";

/// The large module's cold build: minutes when all is well, on a machine
/// shared with other work; past this it hangs.
const LARGE_BUILD_LIMIT: Duration = Duration::from_secs(1800);

/// gocp's figures that are not zero only when something went wrong.
const TROUBLE: [&str; 10] = [
    "put_failures",
    "plugin_errors",
    "plugin_traps",
    "plugin_timeouts",
    "plugin_stuck",
    "breaker_trips",
    "network_denials",
    "local_only_puts",
    "puts_not_recorded",
    "rejected_bodies",
];

/// One case at a time: each keeps both cores busy already (the go command
/// builds in parallel), so two at once only push each other towards their
/// limits.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    TURN.lock().unwrap_or_else(|e| e.into_inner())
}

/// The suite's GOPATH: its module cache keeps toolchains and modules across runs.
fn gopath() -> PathBuf {
    tools_dir().join("go")
}

/// `support::go_command` with the suite's GOPATH and `toolchain` (a
/// GOTOOLCHAIN value), for the local platform; still no network.
fn go_cmd(dir: &Path, gocache: &Path, gocacheprog: Option<&str>, toolchain: &str, args: &[&str]) -> Command {
    let mut cmd = go_command(dir, gocache, gocacheprog, args);
    cmd.env("GOPATH", gopath())
        .env("GOMODCACHE", gopath().join("pkg").join("mod"))
        .env("GOTOOLCHAIN", toolchain)
        .env_remove("GOBIN")
        .env_remove("GOOS")
        .env_remove("GOARCH")
        .env_remove("CGO_ENABLED");
    cmd
}

/// Runs a go command that may download from the Go module proxy into the
/// suite's module cache: a toolchain, a module, the dependencies of one.
fn download(dir: &Path, toolchain: &str, args: &[&str]) -> Output {
    let scratch = tempfile::tempdir().unwrap();
    let proxy = std::env::var("GOPROXY")
        .ok()
        .filter(|p| !p.is_empty() && p != "off")
        .unwrap_or_else(|| "https://proxy.golang.org,direct".into());
    let out = go_cmd(dir, scratch.path(), None, toolchain, args)
        .env("GOPROXY", proxy)
        // Writable, so that the module cache can be removed like any directory.
        .env("GOFLAGS", "-modcacherw")
        .output_within(COMMAND_LIMIT);
    assert!(
        out.status.success(),
        "go {args:?} (GOTOOLCHAIN={toolchain}) could not get what it needs from the Go module proxy:\n{}",
        text(&out.stderr)
    );
    out
}

/// Has the go command download toolchain `version` (once: it stays in the
/// suite's module cache) and checks that it runs.
fn fetch_toolchain(version: &str) {
    let scratch = tempfile::tempdir().unwrap();
    let out = download(scratch.path(), version, &["version"]);
    assert!(text(&out.stdout).starts_with(&format!("go version {version} ")), "{}", text(&out.stdout));
}

/// An executable on PATH.
fn on_path(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} is not on PATH"))
}

fn write_files(dir: &Path, files: &[(&str, &str)]) {
    for (name, body) in files {
        let path = dir.join(name);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, body).unwrap();
    }
}

fn write_script(path: &Path, body: &str) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, body).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

/// Sets every file an hour back: the go command does not cache the result
/// of a test that read a file changed within the last seconds.
fn backdate(dir: &Path) {
    let then = SystemTime::now() - Duration::from_secs(3600);
    for path in files_under(dir) {
        fs::File::options().write(true).open(&path).unwrap().set_modified(then).unwrap();
    }
}

/// `support::write_module` and what the suite needs besides: a `tool`
/// directive for `go tool`, a fuzz test with a seed corpus, a cgo package
/// (with a pure Go twin for builds without cgo) and a package vet faults.
fn write_compat_module(dir: &Path) {
    write_module(dir);
    write_files(
        dir,
        &[
            ("go.mod", "module example.com/gocptest\n\ngo 1.24\n\ntool example.com/gocptest/cmd/tool\n"),
            (
                "mathx/fuzz_test.go",
                "package mathx\n\nimport \"testing\"\n\nfunc FuzzSum(f *testing.F) {\n\tf.Add(1, 2)\n\tf.Fuzz(func(t *testing.T, a, b int) {\n\t\tif Sum(a, b) != a+b {\n\t\t\tt.Fatal(a, b)\n\t\t}\n\t})\n}\n",
            ),
            ("mathx/testdata/fuzz/FuzzSum/seed1", "go test fuzz v1\nint(40)\nint(2)\n"),
            (
                "cgox/cgox.go",
                "//go:build cgo\n\npackage cgox\n\n// static int twice(int x) { return 2 * x; }\nimport \"C\"\n\n// Twice doubles x in C.\nfunc Twice(x int) int { return int(C.twice(C.int(x))) }\n",
            ),
            (
                "cgox/nocgo.go",
                "//go:build !cgo\n\npackage cgox\n\n// Twice doubles x.\nfunc Twice(x int) int { return 2 * x }\n",
            ),
            (
                "cgox/cgox_test.go",
                "package cgox\n\nimport \"testing\"\n\nfunc TestTwice(t *testing.T) {\n\tif Twice(21) != 42 {\n\t\tt.Fatal(Twice(21))\n\t}\n}\n",
            ),
            (
                "vetme/vetme.go",
                "package vetme\n\nimport \"sync\"\n\n// Guarded is a counter behind a lock.\ntype Guarded struct {\n\tmu sync.Mutex\n\tn  int\n}\n\n// Count copies the lock with its receiver.\nfunc (g Guarded) Count() int { return g.n }\n",
            ),
        ],
    );
    backdate(dir);
}

/// A module of our own on a real module graph (cobra, zap and what they
/// require, about 200 packages), with code each tool finds fault with and a
/// cgo package; its go.sum comes from the Go module proxy.
fn write_linted_module(dir: &Path) {
    write_files(
        dir,
        &[
            (
                "go.mod",
                "module example.com/linted\n\ngo 1.24\n\nrequire (\n\tgithub.com/spf13/cobra v1.10.2\n\tgo.uber.org/zap v1.28.0\n)\n\nrequire (\n\tgithub.com/inconshreveable/mousetrap v1.1.0 // indirect\n\tgithub.com/spf13/pflag v1.0.9 // indirect\n\tgo.uber.org/multierr v1.10.0 // indirect\n)\n",
            ),
            (
                "report/report.go",
                "// Package report writes what the command found.\npackage report\n\nimport (\n\t\"fmt\"\n\t\"os\"\n\n\t\"go.uber.org/zap\"\n)\n\n// Write logs the lines and keeps their count in a file.\nfunc Write(log *zap.Logger, path string, lines []string) error {\n\tn := len(lines)\n\tn = 0\n\tfor _, l := range lines {\n\t\tlog.Info(\"line\", zap.String(\"text\", l))\n\t\tn++\n\t}\n\tos.Remove(path + \".old\")\n\tfmt.Printf(\"%d lines in %s\\n\", \"n\", path)\n\treturn os.WriteFile(path, []byte(fmt.Sprint(n)), 0o644)\n}\n\nfunc unusedHelper() int { return 42 }\n",
            ),
            (
                "native/native.go",
                "// Package native adds in C.\npackage native\n\n// static int add(int a, int b) { return a + b; }\nimport \"C\"\n\n// Add adds in C.\nfunc Add(a, b int) int { return int(C.add(C.int(a), C.int(b))) }\n",
            ),
            (
                "cmd/linted/main.go",
                "package main\n\nimport (\n\t\"github.com/spf13/cobra\"\n\t\"go.uber.org/zap\"\n\n\t\"example.com/linted/native\"\n\t\"example.com/linted/report\"\n)\n\nfunc main() {\n\tlog := zap.NewExample()\n\tcmd := &cobra.Command{\n\t\tUse: \"linted\",\n\t\tRunE: func(cmd *cobra.Command, args []string) error {\n\t\t\t_ = native.Add(1, 2)\n\t\t\treturn report.Write(log, \"out.txt\", args)\n\t\t},\n\t}\n\tcmd.Execute()\n}\n",
            ),
        ],
    );
    download(dir, MAIN_TOOLCHAIN, &["mod", "tidy"]);
    backdate(dir);
}

/// What a run observed, by name: outputs, findings, hashes of what it built.
type Facts = BTreeMap<String, String>;

/// One of a case's three runs: a directory of its own (GOCACHE, what it
/// builds) and, through gocp, the case's state directory.
struct Pass {
    label: &'static str,
    root: PathBuf,
    toolchain: String,
    /// gocp's state directory, when the pass goes through gocp.
    state: Option<PathBuf>,
    /// Whether a command printed its steps (`-x`).
    traced: bool,
    /// Steps that compiled something (from `-x`).
    rebuilt: Vec<String>,
    /// Test results that were not from the cache.
    ran_tests: Vec<String>,
    /// Bytes gocp was given to store by commands that cannot print their
    /// steps (`go tool`, linters, gopls): their only sign of rebuilding.
    stored_untraced: u64,
    /// gocp's figures over all the pass's go commands.
    totals: BTreeMap<String, u64>,
    /// gocp's own lines on the commands' stderr (it should say nothing).
    gocp_lines: Vec<String>,
}

impl Pass {
    fn new(root: PathBuf, label: &'static str, toolchain: &str, state: Option<&Path>) -> Pass {
        fs::create_dir_all(root.join("gocache")).unwrap();
        fs::create_dir_all(root.join("stats")).unwrap();
        if let Some(state) = state {
            // A statistics file per go command (a tool runs several).
            let shim = format!(
                "#!/bin/sh\nexec '{BIN}' --dir '{}' --stats-json '{}'/$$.json \"$@\"\n",
                state.display(),
                root.join("stats").display()
            );
            write_script(&root.join("gocp.sh"), &shim);
        }
        Pass {
            label,
            root,
            toolchain: toolchain.into(),
            state: state.map(Path::to_path_buf),
            traced: false,
            rebuilt: vec![],
            ran_tests: vec![],
            stored_untraced: 0,
            totals: BTreeMap::new(),
            gocp_lines: vec![],
        }
    }

    /// A go command with this pass's cache and toolchain.
    fn command(&self, dir: &Path, args: &[&str]) -> Command {
        let prog = self.state.as_ref().map(|_| {
            let shim = self.root.join("gocp.sh").to_str().unwrap().to_string();
            assert!(!shim.contains(char::is_whitespace), "GOCACHEPROG cannot hold spaces: {shim}");
            shim
        });
        go_cmd(dir, &self.root.join("gocache"), prog.as_deref(), &self.toolchain, args)
    }

    /// Another executable (a linter, gopls) with the environment go gets.
    fn tool(&self, exe: &Path, dir: &Path, args: &[&str]) -> Command {
        let like = self.command(dir, &[]);
        let mut cmd = Command::new(exe);
        cmd.args(args).current_dir(dir).stdin(Stdio::null());
        for (key, value) in like.get_envs() {
            match value {
                Some(value) => cmd.env(key, value),
                None => cmd.env_remove(key),
            };
        }
        cmd
    }

    /// Runs `cmd` within the limit, fails the test unless it exits with
    /// `code`, and keeps what the pass is judged by.
    fn run(&mut self, mut cmd: Command, code: i32) -> Output {
        let out = cmd.output_within(COMMAND_LIMIT);
        let args: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert_eq!(
            out.status.code(),
            Some(code),
            "{}: {:?} {args:?} failed:\nstdout:\n{stdout}\nstderr:\n{stderr}",
            self.label,
            cmd.get_program()
        );
        let stats = self.take_stats();
        if args.iter().any(|a| a == "-x") {
            self.traced = true;
            self.rebuilt.extend(rebuild_steps(&stderr));
        } else if !stats.is_empty() {
            self.stored_untraced += stats.get("put_bytes").expect("gocp's statistics have put_bytes");
        }
        if cmd.get_program() == "go" && args.first().map(String::as_str) == Some("test") {
            self.ran_tests.extend(ran_tests(&stdout));
        }
        self.gocp_lines.extend(stderr.lines().filter(|l| l.starts_with("gocp")).map(String::from));
        for (key, n) in stats {
            *self.totals.entry(key).or_default() += n;
        }
        out
    }

    /// Runs a go command that must succeed.
    fn go(&mut self, dir: &Path, args: &[&str]) -> Output {
        let cmd = self.command(dir, args);
        self.run(cmd, 0)
    }

    /// gocp's figures for the commands since the last call, added up.
    fn take_stats(&self) -> BTreeMap<String, u64> {
        let mut sum = BTreeMap::new();
        // gocp-host writes each by renaming a temporary file: only whole ones count.
        for file in
            files_under(&self.root.join("stats")).into_iter().filter(|f| f.extension().is_some_and(|e| e == "json"))
        {
            let stats: Value = serde_json::from_slice(&fs::read(&file).unwrap()).unwrap();
            for (key, n) in stats.as_object().expect("stats are an object") {
                if let Some(n) = n.as_u64() {
                    *sum.entry(key.clone()).or_default() += n;
                }
            }
            fs::remove_file(file).unwrap();
        }
        sum
    }

    /// A path the go command handed out of its cache (export data,
    /// cgo-generated files) stands for its content, which must be the same
    /// whichever cache served it; any other text stays as it is.
    fn steady_path(&self, s: &str) -> String {
        let mut caches = vec![self.root.join("gocache")];
        caches.extend(self.state.clone());
        if caches.iter().any(|c| Path::new(s).starts_with(c)) {
            format!("cached file {}", file_hash(Path::new(s)))
        } else {
            s.to_string()
        }
    }
}

/// Runs `case` with the builtin cache, through gocp from an empty state
/// directory (cold), and through gocp again with a new GOCACHE and the same
/// state directory (warm). All three must observe the same facts; gocp must
/// serve both without trouble or a word on stderr; the warm run must rebuild
/// nothing and take every test result from the cache. Returns the facts.
fn compare(root: &Path, toolchain: &str, case: impl Fn(&mut Pass, &mut Facts)) -> Facts {
    let state = root.join("gocp-state");
    let mut runs: Vec<(Pass, Facts)> =
        [("builtin cache", None), ("gocp cold", Some(&state)), ("gocp warm", Some(&state))]
            .into_iter()
            .map(|(label, state)| {
                let mut pass =
                    Pass::new(root.join(label.replace(' ', "-")), label, toolchain, state.map(PathBuf::as_path));
                let mut facts = Facts::new();
                case(&mut pass, &mut facts);
                (pass, facts)
            })
            .collect();
    let (warm, warm_facts) = runs.pop().unwrap();
    let (cold, cold_facts) = runs.pop().unwrap();
    let (_, facts) = runs.pop().unwrap();
    same_facts(&facts, &cold_facts, cold.label);
    same_facts(&facts, &warm_facts, warm.label);

    let count = |pass: &Pass, key: &str| {
        *pass
            .totals
            .get(key)
            .unwrap_or_else(|| panic!("{}: gocp's statistics have no {key}: {:?}", pass.label, pass.totals))
    };
    for pass in [&cold, &warm] {
        for key in TROUBLE {
            assert_eq!(count(pass, key), 0, "{}: {key}: {:?}", pass.label, pass.totals);
        }
        assert_eq!(pass.gocp_lines, Vec::<String>::new(), "{}: gocp stays quiet", pass.label);
    }
    assert!(count(&cold, "puts") > 0, "the cold run stored its outputs through gocp: {:?}", cold.totals);
    assert!(!cold.traced || !cold.rebuilt.is_empty(), "the cold run through gocp built from nothing");
    assert!(count(&warm, "hits") > 0, "the warm run was served by gocp: {:?}", warm.totals);
    assert!(warm.rebuilt.is_empty(), "the warm run rebuilt nothing, yet:\n{}", first_lines(&warm.rebuilt));
    assert_eq!(warm.ran_tests, Vec::<String>::new(), "the warm run took every test result from the cache");
    assert_eq!(
        warm.stored_untraced, 0,
        "commands that cannot print their steps stored nothing new in the warm run: {:?}",
        warm.totals
    );
    facts
}

/// Fails naming the first fact that differs from the builtin cache's.
fn same_facts(expected: &Facts, got: &Facts, label: &str) {
    let keys = |f: &Facts| f.keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(expected), keys(got), "{label} observed other things than the builtin cache");
    for (key, value) in expected {
        assert_eq!(&got[key], value, "{label}: {key} differs from the builtin cache's");
    }
}

/// How many, and the first few.
fn first_lines(lines: &[String]) -> String {
    format!("{} steps, the first:\n{}", lines.len(), lines.iter().take(5).cloned().collect::<Vec<_>>().join("\n"))
}

fn file_hash(path: &Path) -> String {
    hex::encode(sha256(&fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))))
}

/// Each file in `dir` with the hash of its content.
fn dir_hashes(dir: &Path) -> String {
    let mut lines: Vec<String> = files_under(dir)
        .iter()
        .map(|f| format!("{} {}", f.strip_prefix(dir).unwrap().display(), file_hash(f)))
        .collect();
    lines.sort();
    lines.join("\n")
}

/// Lines of `-x` output that compile something: Go code, assembly, cgo, C.
fn rebuild_steps(stderr: &str) -> Vec<String> {
    let compiles = |word: &str| {
        word == "gcc"
            || word == "cc"
            || (word.contains("/pkg/tool/") && ["/compile", "/asm", "/cgo"].iter().any(|t| word.ends_with(t)))
    };
    stderr.lines().filter(|l| l.split_whitespace().any(compiles)).map(String::from).collect()
}

fn is_duration(s: &str) -> bool {
    s.strip_suffix('s').is_some_and(|n| !n.is_empty() && n.parse::<f64>().is_ok())
}

/// A line of test output without what changes between runs: durations, and
/// `(cached)` on a result from the cache.
fn steady_line(line: &str) -> String {
    let line = line.split('\t').filter(|f| *f != "(cached)" && !is_duration(f)).collect::<Vec<_>>().join("\t");
    // "--- PASS: TestSum (0.00s)"
    match line.rsplit_once(" (") {
        Some((head, tail)) if tail.strip_suffix(')').is_some_and(is_duration) => head.to_string(),
        _ => line,
    }
}

/// What `go test` printed, plain or as `-json` events, line by line.
fn test_lines(stdout: &str) -> Vec<String> {
    if !stdout.starts_with('{') {
        return stdout.lines().map(String::from).collect();
    }
    stdout
        .lines()
        .filter_map(|l| {
            serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("{e}: {l}"))["Output"].as_str().map(String::from)
        })
        .collect()
}

/// Package results that were not from the cache.
fn ran_tests(stdout: &str) -> Vec<String> {
    test_lines(stdout)
        .into_iter()
        .filter(|l| l.starts_with("ok ") && !l.split('\t').any(|f| f.trim_end() == "(cached)"))
        .collect()
}

/// Plain `go test` output without durations and `(cached)`.
fn steady_tests(stdout: &str) -> String {
    stdout.lines().map(steady_line).collect::<Vec<_>>().join("\n")
}

/// `go test -json` events without times and durations, each package's in
/// its order.
fn steady_events(stdout: &str) -> String {
    let mut events: Vec<(String, String)> = stdout
        .lines()
        .map(|l| {
            let mut event: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            let fields = event.as_object_mut().unwrap();
            fields.remove("Time");
            fields.remove("Elapsed");
            if let Some(Value::String(output)) = fields.get_mut("Output") {
                *output = output.lines().map(steady_line).collect::<Vec<_>>().join("\n");
            }
            (event["Package"].as_str().unwrap_or_default().to_string(), event.to_string())
        })
        .collect();
    events.sort_by(|a, b| a.0.cmp(&b.0));
    events.into_iter().map(|(_, e)| e).collect::<Vec<_>>().join("\n")
}

/// Lines that report something at a place in a Go file (`file.go:12:3: ...`),
/// sorted: what vet, the linters and gopls found.
fn findings(output: &str) -> String {
    let mut found: Vec<&str> = output
        .lines()
        .filter(|l| {
            l.split_once(".go:").is_some_and(|(file, rest)| {
                !file.is_empty()
                    && !file.contains(char::is_whitespace)
                    && rest.starts_with(|c: char| c.is_ascii_digit())
            })
        })
        .collect();
    found.sort();
    found.join("\n")
}

/// `go list -export -deps ./...`: each package with the content of its
/// export data.
fn export_data(p: &mut Pass, module: &Path) -> String {
    let out = p.go(module, &["list", "-x", "-export", "-deps", "-f", "{{.ImportPath}} {{.Export}}", "./..."]);
    text(&out.stdout)
        .lines()
        .map(|l| match l.split_once(' ') {
            Some((pkg, export)) if !export.is_empty() => format!("{pkg} {}", p.steady_path(export)),
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

const TOOL_OUTPUT: &str = "{\"alpha\":0,\"beta\":1,\"gamma\":2} 3\n";

#[test]
fn go_build_install_run_tool_test_vet_list_and_cgo() {
    let _turn = one_at_a_time();
    require_go();
    fetch_toolchain(MAIN_TOOLCHAIN);
    let tmp = tempfile::tempdir().unwrap();
    let module = tmp.path().join("module");
    write_compat_module(&module);
    let facts = compare(tmp.path(), MAIN_TOOLCHAIN, |p, facts| {
        p.go(&module, &["build", "-x", "./..."]);
        let bin = p.root.join("trimpath").join("tool");
        p.go(&module, &["build", "-x", "-trimpath", "-o", bin.to_str().unwrap(), "./cmd/tool"]);
        facts.insert("go build -trimpath: the binary".into(), file_hash(&bin));

        let gobin = p.root.join("gobin");
        let mut install = p.command(&module, &["install", "-x", "./cmd/tool"]);
        install.env("GOBIN", &gobin);
        p.run(install, 0);
        facts.insert("go install: the binary".into(), dir_hashes(&gobin));

        let run = p.go(&module, &["run", "-x", "./cmd/tool"]);
        facts.insert("go run: output".into(), text(&run.stdout));
        let tool = p.go(&module, &["tool", "tool"]);
        facts.insert("go tool: output".into(), text(&tool.stdout));

        let test = p.go(&module, &["test", "-x", "./..."]);
        facts.insert("go test".into(), steady_tests(&text(&test.stdout)));
        let profile = p.root.join("cover.out");
        let cover = p.go(&module, &["test", "-x", "-cover", &format!("-coverprofile={}", profile.display()), "./..."]);
        facts.insert("go test -cover".into(), steady_tests(&text(&cover.stdout)));
        let mut blocks: Vec<String> = fs::read_to_string(&profile).unwrap().lines().map(String::from).collect();
        blocks.sort();
        facts.insert("go test -cover: the profile".into(), blocks.join("\n"));
        let json = p.go(&module, &["test", "-json", "./..."]);
        facts.insert("go test -json".into(), steady_events(&text(&json.stdout)));
        let fuzz = p.go(&module, &["test", "-x", "-v", "-run", "FuzzSum", "./mathx"]);
        facts.insert("go test: fuzz seed corpus".into(), steady_tests(&text(&fuzz.stdout)));

        let vet = p.command(&module, &["vet", "-x", "./..."]);
        let vet = p.run(vet, 1);
        facts.insert("go vet: findings".into(), findings(&text(&vet.stderr)));

        facts.insert("go list -export".into(), export_data(p, &module));
        let compiled =
            p.go(&module, &["list", "-x", "-compiled", "-f", "{{range .CompiledGoFiles}}{{.}}\n{{end}}", "./cgox"]);
        let compiled: Vec<String> = text(&compiled.stdout).lines().map(|f| p.steady_path(f)).collect();
        facts.insert("go list -compiled: the cgo package's files".into(), compiled.join("\n"));
    });
    assert_eq!(facts["go run: output"], TOOL_OUTPUT);
    assert_eq!(facts["go tool: output"], TOOL_OUTPUT);
    assert!(facts["go test"].contains("ok  \texample.com/gocptest/cgox"), "{}", facts["go test"]);
    assert!(
        facts["go test: fuzz seed corpus"].contains("--- PASS: FuzzSum/seed1"),
        "{}",
        facts["go test: fuzz seed corpus"]
    );
    assert!(facts["go test -json"].contains("FuzzSum/seed1"));
    assert!(facts["go vet: findings"].contains("passes lock by value"), "{}", facts["go vet: findings"]);
    assert!(facts["go list -compiled: the cgo package's files"].contains("cached file"), "cgo's output is cached");
}

#[test]
fn go_test_and_build_with_the_race_detector() {
    let _turn = one_at_a_time();
    require_go();
    fetch_toolchain(MAIN_TOOLCHAIN);
    let tmp = tempfile::tempdir().unwrap();
    let module = tmp.path().join("module");
    write_compat_module(&module);
    let facts = compare(tmp.path(), MAIN_TOOLCHAIN, |p, facts| {
        let test = p.go(&module, &["test", "-x", "-race", "./..."]);
        facts.insert("go test -race".into(), steady_tests(&text(&test.stdout)));
        let bin = p.root.join("tool");
        p.go(&module, &["build", "-x", "-race", "-trimpath", "-o", bin.to_str().unwrap(), "./cmd/tool"]);
        facts.insert("go build -race: the binary".into(), file_hash(&bin));
    });
    assert!(facts["go test -race"].contains("ok  \texample.com/gocptest/cgox"), "{}", facts["go test -race"]);
}

#[test]
fn cross_builds_for_other_goos_and_goarch() {
    let _turn = one_at_a_time();
    require_go();
    fetch_toolchain(MAIN_TOOLCHAIN);
    let tmp = tempfile::tempdir().unwrap();
    let module = tmp.path().join("module");
    write_compat_module(&module);
    compare(tmp.path(), MAIN_TOOLCHAIN, |p, facts| {
        for (goos, goarch) in [("windows", "amd64"), ("darwin", "arm64"), ("linux", "arm64")] {
            let bin = p.root.join(format!("{goos}-{goarch}"));
            let mut build =
                p.command(&module, &["build", "-x", "-trimpath", "-o", bin.to_str().unwrap(), "./cmd/tool"]);
            build.env("GOOS", goos).env("GOARCH", goarch);
            p.run(build, 0);
            facts.insert(format!("{goos}/{goarch}: the binary"), file_hash(&bin));
            let mut vet = p.command(&module, &["vet", "-x", "./mathx", "./textx", "./cgox"]);
            vet.env("GOOS", goos).env("GOARCH", goarch);
            let vet = p.run(vet, 0);
            facts.insert(format!("{goos}/{goarch}: go vet"), findings(&text(&vet.stderr)));
        }
    });
}

/// The core of the suite (build, test with a fuzz seed corpus, vet, list
/// -export, run) on the toolchain the go command downloads for
/// GOTOOLCHAIN=`version`.
fn toolchain(version: &str) {
    let _turn = one_at_a_time();
    require_go();
    fetch_toolchain(version);
    let tmp = tempfile::tempdir().unwrap();
    let module = tmp.path().join("module");
    write_compat_module(&module);
    let facts = compare(tmp.path(), version, |p, facts| {
        facts.insert("go version".into(), text(&p.go(&module, &["version"]).stdout));
        let bin = p.root.join("tool");
        p.go(&module, &["build", "-x", "-trimpath", "-o", bin.to_str().unwrap(), "./cmd/tool"]);
        facts.insert("go build -trimpath: the binary".into(), file_hash(&bin));
        let test = p.go(&module, &["test", "-x", "./..."]);
        facts.insert("go test".into(), steady_tests(&text(&test.stdout)));
        let fuzz = p.go(&module, &["test", "-x", "-v", "-run", "FuzzSum", "./mathx"]);
        facts.insert("go test: fuzz seed corpus".into(), steady_tests(&text(&fuzz.stdout)));
        let vet = p.command(&module, &["vet", "-x", "./..."]);
        let vet = p.run(vet, 1);
        facts.insert("go vet: findings".into(), findings(&text(&vet.stderr)));
        facts.insert("go list -export".into(), export_data(p, &module));
        let run = p.go(&module, &["run", "-x", "./cmd/tool"]);
        facts.insert("go run: output".into(), text(&run.stdout));
    });
    assert!(facts["go version"].starts_with(&format!("go version {version} ")), "{}", facts["go version"]);
    assert_eq!(facts["go run: output"], TOOL_OUTPUT);
    assert!(facts["go test: fuzz seed corpus"].contains("--- PASS: FuzzSum/seed1"));
    assert!(facts["go vet: findings"].contains("passes lock by value"), "{}", facts["go vet: findings"]);
}

#[test]
fn toolchain_go1_24() {
    toolchain(TOOLCHAINS[0]);
}

#[test]
fn toolchain_go1_25() {
    toolchain(TOOLCHAINS[1]);
}

#[test]
fn toolchain_go1_27() {
    toolchain(TOOLCHAINS[3]);
}

#[test]
fn staticcheck_finds_the_same_through_gocp() {
    let _turn = one_at_a_time();
    require_go();
    fetch_toolchain(MAIN_TOOLCHAIN);
    let staticcheck = tool("staticcheck");
    let tmp = tempfile::tempdir().unwrap();
    let module = tmp.path().join("module");
    write_linted_module(&module);
    let facts = compare(tmp.path(), MAIN_TOOLCHAIN, |p, facts| {
        let mut lint = p.tool(&staticcheck, &module, &["./..."]);
        lint.env("STATICCHECK_CACHE", p.root.join("staticcheck"));
        let out = p.run(lint, 1);
        facts.insert("findings".into(), findings(&text(&out.stdout)));
    });
    for check in ["(SA4006)", "(SA5009)", "(U1000)"] {
        assert!(facts["findings"].contains(check), "staticcheck found {check}:\n{}", facts["findings"]);
    }
}

#[test]
fn golangci_lint_finds_the_same_through_gocp() {
    let _turn = one_at_a_time();
    require_go();
    fetch_toolchain(MAIN_TOOLCHAIN);
    let golangci_lint = tool("golangci-lint");
    let tmp = tempfile::tempdir().unwrap();
    let module = tmp.path().join("module");
    write_linted_module(&module);
    let facts = compare(tmp.path(), MAIN_TOOLCHAIN, |p, facts| {
        let mut lint = p.tool(&golangci_lint, &module, &["run", "--no-config", "./..."]);
        lint.env("GOLANGCI_LINT_CACHE", p.root.join("golangci-lint"));
        let out = p.run(lint, 1);
        facts.insert("findings".into(), findings(&text(&out.stdout)));
    });
    for linter in ["(errcheck)", "(govet)", "(ineffassign)", "(unused)"] {
        assert!(facts["findings"].contains(linter), "golangci-lint found {linter}:\n{}", facts["findings"]);
    }
}

#[test]
fn gopls_go_list_calls_and_check_are_the_same_through_gocp() {
    let _turn = one_at_a_time();
    require_go();
    fetch_toolchain(MAIN_TOOLCHAIN);
    let gopls = tool("gopls");
    let go = on_path("go");
    let tmp = tempfile::tempdir().unwrap();
    let module = tmp.path().join("module");
    write_linted_module(&module);
    let facts = compare(tmp.path(), MAIN_TOOLCHAIN, |p, facts| {
        // gopls finds go on PATH: this one keeps each call's arguments and output.
        let calls = p.root.join("go-calls");
        fs::create_dir_all(&calls).unwrap();
        let wrapper = format!(
            "#!/bin/sh\nprintf '%s\\n' \"$@\" > '{calls}'/$$.args\n'{go}' \"$@\" > '{calls}'/$$.out\nstatus=$?\ncat '{calls}'/$$.out\nexit $status\n",
            calls = calls.display(),
            go = go.display()
        );
        write_script(&p.root.join("bin").join("go"), &wrapper);
        let path = std::env::join_paths(
            std::iter::once(p.root.join("bin")).chain(std::env::split_paths(&std::env::var_os("PATH").unwrap())),
        )
        .unwrap();
        let files = ["report/report.go", "native/native.go", "cmd/linted/main.go"];
        let mut check = p.tool(&gopls, &module, &[&["check"][..], &files[..]].concat());
        check.env("GOPLSCACHE", p.root.join("gopls")).env("PATH", path);
        let out = p.run(check, 0);
        facts.insert("gopls check: findings".into(), findings(&text(&out.stdout)));

        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for args_file in files_under(&calls).into_iter().filter(|f| f.extension().is_some_and(|e| e == "args")) {
            let args = fs::read_to_string(&args_file).unwrap().lines().collect::<Vec<_>>().join(" ");
            if !args.starts_with("list ") {
                continue;
            }
            let listed = fs::read_to_string(args_file.with_extension("out")).unwrap();
            let n = seen.entry(args.clone()).or_default();
            *n += 1;
            let listed = if args.contains(" -json") { steady_list(p, &listed) } else { listed };
            facts.insert(format!("gopls's go {args} (call {n})"), listed);
        }
    });
    let check = &facts["gopls check: findings"];
    assert!(check.contains("format %d has arg \"n\" of wrong type string"), "gopls found the printf mistake:\n{check}");
    assert!(
        facts.keys().any(|k| k.contains("-compiled=true") && k.contains("-deps=true")),
        "gopls loaded the workspace with go list: {:?}",
        facts.keys().collect::<Vec<_>>()
    );
}

/// `go list -json` output with the paths into a cache standing for their content.
fn steady_list(p: &Pass, listed: &str) -> String {
    fn walk(p: &Pass, value: &mut Value) {
        match value {
            Value::String(s) => *s = p.steady_path(s),
            Value::Array(items) => items.iter_mut().for_each(|v| walk(p, v)),
            Value::Object(fields) => fields.values_mut().for_each(|v| walk(p, v)),
            _ => {}
        }
    }
    serde_json::Deserializer::from_str(listed)
        .into_iter::<Value>()
        .map(|v| {
            let mut v = v.unwrap_or_else(|e| panic!("go list printed non-JSON ({e}):\n{listed}"));
            walk(p, &mut v);
            v.to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Builds every package of a module, its commands into `out` (a directory).
fn build_everything(out: &str) -> [&str; 6] {
    ["build", "-x", "-trimpath", "-o", out, "./..."]
}

/// Copies a directory tree (a module out of the module cache, read-only
/// there) into a writable checkout.
fn copy_tree(from: &Path, to: &Path) {
    for file in files_under(from) {
        let dest = to.join(file.strip_prefix(from).unwrap());
        fs::create_dir_all(dest.parent().unwrap()).unwrap();
        fs::copy(&file, &dest).unwrap();
        fs::set_permissions(&dest, fs::Permissions::from_mode(0o644)).unwrap();
    }
}

#[test]
fn large_module_cold_on_one_machine_warm_on_another_through_redis() {
    let _turn = one_at_a_time();
    require_go();
    fetch_toolchain(MAIN_TOOLCHAIN);
    let tmp = tempfile::tempdir().unwrap();
    let fetched = download(tmp.path(), MAIN_TOOLCHAIN, &["mod", "download", "-json", LARGE_MODULE]);
    let info: Value = serde_json::from_slice(&fetched.stdout).unwrap();
    let source = PathBuf::from(info["Dir"].as_str().expect("go mod download names the module's directory"));
    let (src_a, src_b, src_c) = (tmp.path().join("a/src"), tmp.path().join("b/checkout/src"), tmp.path().join("c/src"));
    for src in [&src_a, &src_b, &src_c] {
        copy_tree(&source, src);
    }
    // Its dependencies, into the module cache the builds then use offline.
    download(&src_a, MAIN_TOOLCHAIN, &["list", "-deps", "./..."]);

    let redis = Redis::start();
    let backend = redis.backend();
    let (a, b) = (Machine::new(&tmp.path().join("a")), Machine::new(&tmp.path().join("b")));
    let c = tmp.path().join("c");
    let outputs = |root: &Path| format!("{}/", root.join("bin").display());
    let build = |mut cmd: Command, what: &str| {
        cmd.env("GOPATH", gopath())
            .env("GOMODCACHE", gopath().join("pkg").join("mod"))
            .env("GOTOOLCHAIN", MAIN_TOOLCHAIN);
        let started = Instant::now();
        let out = cmd.output_within(LARGE_BUILD_LIMIT);
        assert!(out.status.success(), "{what} failed:\n{}", text(&out.stderr));
        assert_eq!(gocp_lines(&out.stderr), Vec::<String>::new(), "{what}: gocp stays quiet");
        (rebuild_steps(&text(&out.stderr)), started.elapsed())
    };
    let no_trouble = |stats: &Value, machine: &str| {
        for key in TROUBLE {
            assert_eq!(stats[key], 0, "{machine}: {key}: {stats}");
        }
    };

    let out_a = outputs(&a.root);
    let (a_steps, a_time) = build(a.go(&backend, &src_a, &build_everything(&out_a)), "machine A's cold build");
    assert!(a_steps.len() > 500, "A compiled hundreds of packages: {}", a_steps.len());
    let a_stats = a.stats();
    no_trouble(&a_stats, "A");

    let out_b = outputs(&b.root);
    let (b_steps, b_time) = build(b.go(&backend, &src_b, &build_everything(&out_b)), "machine B's warm build");
    assert!(b_steps.is_empty(), "machine B compiled nothing, yet:\n{}", first_lines(&b_steps));
    let b_stats = b.stats();
    no_trouble(&b_stats, "B");
    let fetched = b_stats["hits_fetched"].as_u64().unwrap() + b_stats["prefetched"].as_u64().unwrap();
    assert!(fetched > 0, "B's outputs came from Redis: {b_stats}");
    let binaries = dir_hashes(&a.root.join("bin"));
    assert!(!binaries.is_empty(), "A built binaries");
    assert_eq!(binaries, dir_hashes(&b.root.join("bin")), "A's and B's binaries are byte-identical");

    // The go command's own cache, from nothing, builds the same binaries.
    let out_c = outputs(&c);
    let builtin = go_cmd(&src_c, &c.join("gocache"), None, MAIN_TOOLCHAIN, &build_everything(&out_c));
    let (c_steps, c_time) = build(builtin, "the build with the builtin cache");
    assert_eq!(binaries, dir_hashes(&c.join("bin")), "gocp's binaries are the builtin cache's");
    eprintln!(
        "{LARGE_MODULE}: A cold {a_time:.0?} ({} compile steps, {} puts), B warm {b_time:.0?} ({} compile steps, {fetched} outputs from Redis), builtin cache cold {c_time:.0?} ({} compile steps)",
        a_steps.len(),
        a_stats["puts"],
        b_steps.len(),
        c_steps.len()
    );
}
