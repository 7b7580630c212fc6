//! `gocp-host plugin-test`: runs the contract of `wit/gocp.wit` against a
//! plugin and reports each check, so that a plugin author (in any language)
//! learns what the host would object to before users do.
//!
//! It owns only those checks. It calls the plugin as serving does, and
//! bodies it reads back go through the same stages and the same verifying
//! store (a scratch one); it must never change what a plugin is allowed (the
//! same sandbox applies).

use std::io::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use sha2::{Digest as _, Sha256};

use crate::backend::{Deadline, Entry, Instance as _, Progress, ReadBody, StoredEntry};
use crate::domain::{Stored, now_ns};
use crate::local::store::{CommitError, Store};
use crate::plugin::{Instance, OpenError, Options, Template};
use crate::serve::stages::{self, Compression};

/// One line of the report.
pub struct Check {
    pub name: String,
    /// `None` when the check passed; otherwise what went wrong.
    pub failure: Option<String>,
}

pub struct Report {
    pub plugin: String,
    pub checks: Vec<Check>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.failure.is_none())
    }

    pub fn table(&self) -> String {
        let mut out = format!("conformance of {}\n", self.plugin);
        let width = self.checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
        for c in &self.checks {
            match &c.failure {
                None => out.push_str(&format!("  pass  {}\n", c.name)),
                Some(why) => out.push_str(&format!("  FAIL  {:width$}  {why}\n", c.name)),
            }
        }
        let failed = self.checks.iter().filter(|c| c.failure.is_some()).count();
        out.push_str(&format!("{} checks, {} failed\n", self.checks.len(), failed));
        out
    }
}

fn digest(label: &str) -> [u8; 32] {
    Sha256::digest(format!("gocp plugin-test {label} {}", now_ns()).as_bytes()).into()
}

/// A deadline for one call, as serving gives it.
fn deadline(timeout: Duration) -> Deadline {
    Deadline::start(timeout, &Progress::default())
}

/// Runs every check. `options` says which plugin, with which configuration
/// and grants, as for serving; `scratch` is a directory to keep bodies read
/// back in.
pub fn run(options: Options, scratch: &Path) -> Result<Report> {
    let what = options.source.describe();
    let timeout = options.call_timeout;
    let template = Template::new(options).with_context(|| format!("plugin {what}"))?;
    let store = Store::open(&scratch.join("local")).context("creating a scratch store")?;
    let mut checks = Vec::new();
    let mut check = |name: &str, result: Result<(), String>| {
        checks.push(Check { name: name.to_string(), failure: result.err() });
    };

    let (mut probe, info) = template.instantiate(&deadline(timeout)).with_context(|| format!("plugin {what}"))?;
    check(
        "describe: a name and a version",
        if info.name.trim().is_empty() || info.version.trim().is_empty() {
            Err(format!("name {:?}, version {:?}", info.name, info.version))
        } else {
            Ok(())
        },
    );
    check(
        "describe: every config key has a name and help",
        match info.config_keys.iter().find(|k| k.name.trim().is_empty() || k.help.trim().is_empty()) {
            Some(k) => Err(format!("key {:?} with help {:?}", k.name, k.help)),
            None => Ok(()),
        },
    );
    let unknown = vec![("gocp-plugin-test-unknown-key".to_string(), "1".to_string())];
    check(
        "open rejects an unknown config key with invalid-config",
        match probe.open(&unknown, &deadline(timeout)) {
            Err(OpenError::Config(_)) => Ok(()),
            Err(OpenError::Failed(e)) => Err(format!("failed another way: {e}")),
            Ok(_) => Err("accepted it: a typo in --config would go unnoticed".into()),
        },
    );

    let (mut first, _) = template.instantiate(&deadline(timeout)).with_context(|| format!("plugin {what}"))?;
    let stores_bodies = match first.open(&template.options.config, &deadline(timeout)) {
        Ok(caps) => caps.stores_bodies,
        Err(e) => {
            let why = match e {
                OpenError::Config(m) => format!("invalid-config: {m}"),
                OpenError::Failed(e) => e.to_string(),
            };
            check("open with the given configuration", Err(why));
            return Ok(Report { plugin: format!("{} {} ({})", info.name, info.version, template.contract()), checks });
        }
    };
    check("open with the given configuration", Ok(()));

    let action = digest("action");
    check(
        "read-entry of an unknown action is not-found",
        match first.read_entry(&action, &deadline(timeout)) {
            Ok(None) => Ok(()),
            Ok(Some(e)) => Err(format!("returned {}", show(&e))),
            Err(e) => Err(e.to_string()),
        },
    );
    // Host data as a signature looks (the contract 0.1 carries none).
    let host_data: Vec<u8> = if template.carries_host_data() { (0..65u8).collect() } else { Vec::new() };
    let stored = |output: &str, size: u64| StoredEntry {
        entry: Entry { output_id: digest(output), size, put_time_ns: now_ns() },
        host_data: host_data.clone(),
    };
    let entry = stored("output", 1234);
    check(
        "write-entry then read-entry returns it, host data and all",
        put_then_get(&mut first, timeout, &action, &entry),
    );
    check("write-entry is idempotent", put_then_get(&mut first, timeout, &action, &entry));
    check("write-entry replaces an older entry", put_then_get(&mut first, timeout, &action, &stored("output 2", 99)));

    if stores_bodies {
        for size in [0usize, 1024, 8 << 20] {
            let body: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
            check(
                &format!("write-body then read-body, {size} bytes"),
                body_round_trip(&mut first, timeout, &store, scratch, &body),
            );
        }
        check("read-body of an unknown output is not-found", {
            let progress = Progress::default();
            let entry = Entry { output_id: digest("no body"), size: 10, put_time_ns: 0 };
            let writer = store.begin().context("scratch store")?;
            let (sink, _) = stages::body_in(writer, &entry, &Stored::AsIs, &progress).context("scratch store")?;
            match first.read_body(&digest("no body"), 10, sink, &deadline(timeout)) {
                Ok(ReadBody::NotFound) => Ok(()),
                Ok(ReadBody::Written(_)) => Err("it wrote a body".into()),
                Err(e) => Err(e.to_string()),
            }
        });
    }

    if info.max_instances != 1 {
        let mut second = template.instantiate_open(&deadline(timeout)).map_err(open_error)?;
        let shared_action = digest("shared action");
        let shared = stored("shared output", 7);
        check(
            "an entry written by one instance is read by another",
            first.write_entry(&shared_action, &shared, &deadline(timeout)).map_err(|e| e.to_string()).and_then(|()| {
                match second.read_entry(&shared_action, &deadline(timeout)) {
                    Ok(Some(e)) if e == shared => Ok(()),
                    Ok(Some(e)) => Err(format!("the second instance read {}", show(&e))),
                    Ok(None) => Err("the second instance says not-found".into()),
                    Err(e) => Err(format!("the second instance: {e}")),
                }
            }),
        );
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let mut instance = template.instantiate_open(&deadline(timeout)).map_err(open_error);
                std::thread::spawn(move || -> Result<(), String> {
                    let instance = instance.as_mut().map_err(|e| e.to_string())?;
                    for n in 0..50 {
                        let a = digest(&format!("thread {t} action {n}"));
                        let entry =
                            Entry { output_id: digest(&format!("thread {t} output {n}")), size: n, put_time_ns: 1 };
                        put_then_get(instance, timeout, &a, &StoredEntry { entry, host_data: Vec::new() })?;
                    }
                    Ok(())
                })
            })
            .collect();
        let results: Vec<Result<(), String>> =
            threads.into_iter().map(|t| t.join().unwrap_or_else(|_| Err("thread panicked".into()))).collect();
        check(
            "4 instances writing and reading at once",
            results.into_iter().collect::<Result<Vec<()>, String>>().map(|_| ()),
        );
        check("finish (second instance)", second.finish(&deadline(timeout)).map_err(|e| e.to_string()));
    }
    check("finish", first.finish(&deadline(timeout)).map_err(|e| e.to_string()));
    Ok(Report { plugin: format!("{} {} ({})", info.name, info.version, template.contract()), checks })
}

fn open_error(e: OpenError) -> anyhow::Error {
    match e {
        OpenError::Config(m) => anyhow::anyhow!("invalid configuration: {m}"),
        OpenError::Failed(e) => anyhow::anyhow!("{e}"),
    }
}

/// An entry as a person reads it: the output id in hex.
fn show(e: &StoredEntry) -> String {
    let StoredEntry { entry, host_data } = e;
    format!(
        "{{output {}, {} bytes, put at {} ns, {} bytes of host data}}",
        hex::encode(entry.output_id),
        entry.size,
        entry.put_time_ns,
        host_data.len()
    )
}

fn put_then_get(
    instance: &mut Instance,
    timeout: Duration,
    action: &[u8; 32],
    entry: &StoredEntry,
) -> Result<(), String> {
    instance.write_entry(action, entry, &deadline(timeout)).map_err(|e| format!("write-entry: {e}"))?;
    match instance.read_entry(action, &deadline(timeout)) {
        Ok(Some(got)) if got == *entry => Ok(()),
        Ok(Some(got)) => Err(format!("wrote {}, read {}", show(entry), show(&got))),
        Ok(None) => Err("read-entry says not-found right after write-entry".into()),
        Err(e) => Err(format!("read-entry: {e}")),
    }
}

/// Gives the plugin `body`, reads it back into the scratch store, which
/// keeps it only if it hashes to its output id.
fn body_round_trip(
    instance: &mut Instance,
    timeout: Duration,
    store: &Store,
    scratch: &Path,
    body: &[u8],
) -> Result<(), String> {
    let output: [u8; 32] = Sha256::digest(body).into();
    let given = scratch.join("given");
    std::fs::File::create(&given).and_then(|mut f| f.write_all(body)).map_err(|e| e.to_string())?;
    let file = std::fs::File::open(&given).map_err(|e| e.to_string())?;
    let progress = Progress::default();
    let entry = Entry { output_id: output, size: body.len() as u64, put_time_ns: 0 };
    // The body as the go command wrote it: what the plugin stores must not
    // depend on what the host does to bodies.
    let (_, source) = stages::body_out(file, &entry, Compression::None, false, &progress).map_err(|e| e.to_string())?;
    let source = source.ok_or("a body not carried in its entry has bytes to send")?;
    instance
        .write_body(&output, body.len() as u64, source, &deadline(timeout))
        .map_err(|e| format!("write-body: {e}"))?;
    let writer = store.begin().map_err(|e| e.to_string())?;
    let (sink, _) = stages::body_in(writer, &entry, &Stored::AsIs, &progress).map_err(|e| e.to_string())?;
    let writer = match instance.read_body(&output, body.len() as u64, sink, &deadline(timeout)) {
        Ok(ReadBody::Written(sink)) => sink.finish().map_err(|e| format!("read-body: {e}"))?,
        Ok(ReadBody::NotFound) => return Err("read-body says not-found right after write-body".into()),
        Err(e) => return Err(format!("read-body: {e}")),
    };
    match store.commit(writer, &output, body.len() as u64) {
        Ok(_) => Ok(()),
        Err(CommitError::HashMismatch { .. }) => Err("read-body gave bytes that do not hash to the output id".into()),
        Err(CommitError::SizeMismatch { actual, .. }) => Err(format!("read-body gave {actual} bytes")),
        Err(CommitError::Io(e)) => Err(format!("keeping what read-body gave: {e}")),
    }
}
