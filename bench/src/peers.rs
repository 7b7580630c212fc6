//! The other GOCACHEPROG helpers the remote part measures gocp against
//! (platacard/cacheprog, bradfitz go-cacher with gocached, yonesko/gocacheprog,
//! tailscale/go-cache-plugin), and bazel-remote when `.ci/tools/bazel-remote.sh`
//! has not installed it: built from the unmodified sources kept beside this
//! repository (`../shared/peers`, whose SOURCES.md names each commit) by that
//! directory's own build.sh, into `$GOCP_TEST_TOOLS/bench-peers/<key>`, the
//! key derived from SOURCES.md and build.sh, so a second run builds nothing.
//!
//! It never starts a peer or a server, never changes the sources, and never
//! fails the benchmark: a missing source directory or a peer that does not
//! build is said on stderr, and that peer's row is left out.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::{bounded, servers};

/// (build.sh's name for it, the executable it makes).
const PEERS: &[(&str, &str)] = &[
    ("go-cacher", "go-cacher"),
    ("gocached", "gocached"),
    ("cacheprog", "cacheprog"),
    ("yonesko", "yonesko-gocacheprog"),
    ("go-cache-plugin", "go-cache-plugin"),
];

/// Where the built peers are, if anywhere.
pub struct Peers {
    bin: Option<PathBuf>,
    /// Why there are none, when there are none.
    why_none: String,
}

impl Peers {
    /// No peers (for the reason given): gocp and the builtin cache alone.
    pub fn none(why: &str) -> Peers {
        Peers { bin: None, why_none: why.to_string() }
    }

    /// The peers built from `source` (a directory holding build.sh and
    /// SOURCES.md). With `build`, builds those not built yet (this needs the
    /// Go module proxy, so it happens before the benchmark enters its
    /// network namespace); without, only finds them.
    pub fn prepare(source: &Path, build: bool) -> Peers {
        let (Ok(sources), Ok(script)) =
            (std::fs::read(source.join("SOURCES.md")), std::fs::read(source.join("build.sh")))
        else {
            if build {
                eprintln!(
                    "no peer sources at {} (SOURCES.md and build.sh): the other helpers are left out; \
                     gocp and the builtin cache run alone",
                    source.display()
                );
            }
            return Peers::none(&format!("no peer sources at {}", source.display()));
        };
        let Ok(tools) = servers::tools_dir() else {
            eprintln!("HOME and GOCP_TEST_TOOLS are unset: nowhere to build the peers; they are left out");
            return Peers::none("nowhere to build the peers");
        };
        let key: String = Sha256::new()
            .chain_update(&sources)
            .chain_update(&script)
            .finalize()
            .iter()
            .take(6)
            .map(|b| format!("{b:02x}"))
            .collect();
        let dir = tools.join("bench-peers").join(key);
        if build {
            let mut wanted: Vec<(&str, &str)> = PEERS.to_vec();
            if servers::tool("bazel-remote", "bazel-remote").is_err() {
                wanted.push(("bazel-remote", "bazel-remote"));
            }
            for (name, exe) in wanted {
                if dir.join("bin").join(exe).is_file() {
                    continue;
                }
                eprintln!("building peer {name} from {} (once, into {})...", source.display(), dir.display());
                let mut cmd = Command::new("bash");
                cmd.arg(source.join("build.sh")).arg(&dir).arg(name);
                // The suite's own module cache, as .ci/tools/bazel-remote.sh does.
                cmd.env("GOPATH", tools.join("go")).env("GOPROXY", "https://proxy.golang.org");
                match bounded::run(&mut cmd, &format!("build.sh {name}"), Duration::from_secs(20 * 60)) {
                    Ok(done) if done.status.success() && dir.join("bin").join(exe).is_file() => {}
                    Ok(done) => eprintln!(
                        "peer {name} failed to build ({}); its row is left out:\n{}",
                        done.status,
                        bounded::tail(&done.stderr, 15)
                    ),
                    Err(e) => eprintln!("peer {name} failed to build ({e:#}); its row is left out"),
                }
            }
        }
        Peers { bin: Some(dir.join("bin")), why_none: String::new() }
    }

    /// A built peer's executable.
    pub fn exe(&self, name: &str) -> Option<PathBuf> {
        self.bin.as_ref().map(|b| b.join(name)).filter(|p| p.is_file())
    }

    /// Why there are no peers at all, if there are none.
    pub fn absent(&self) -> Option<&str> {
        self.bin.is_none().then_some(self.why_none.as_str())
    }
}
