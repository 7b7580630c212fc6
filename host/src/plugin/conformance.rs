//! `gocp-host plugin-test`: runs the contract of `wit/gocp.wit` against a
//! plugin and reports each check, so that a plugin author (in any language)
//! learns what the host would object to before users do.
//!
//! It owns only those checks and calls the plugin exactly as the server does;
//! it must never change what a plugin is allowed (the same sandbox applies).

use std::io::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use sha2::{Digest as _, Sha256};

use super::{Entry, Instance, Options, Template};

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

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// Runs every check. `options` says which plugin, with which configuration
/// and grants, as for serving.
pub fn run(options: Options) -> Result<Report> {
    let what = options.source.describe();
    let template = Template::new(options).with_context(|| format!("plugin {what}"))?;
    let mut checks = Vec::new();
    let mut check = |name: &str, result: Result<(), String>| {
        checks.push(Check { name: name.to_string(), failure: result.err() });
    };

    let (mut probe, info) = template.instantiate(None).with_context(|| format!("plugin {what}"))?;
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
        match probe.open(&unknown) {
            Err(super::OpenError::Config(_)) => Ok(()),
            Err(super::OpenError::Failed(e)) => Err(format!("failed another way: {e}")),
            Ok(_) => Err("accepted it: a typo in --config would go unnoticed".into()),
        },
    );

    let (mut first, _) = template.instantiate(None).with_context(|| format!("plugin {what}"))?;
    let stores_bodies = match first.open(&template.options.config) {
        Ok(caps) => caps.stores_bodies,
        Err(e) => {
            let why = match e {
                super::OpenError::Config(m) => format!("invalid-config: {m}"),
                super::OpenError::Failed(e) => e.to_string(),
            };
            check("open with the given configuration", Err(why));
            return Ok(Report { plugin: format!("{} {}", info.name, info.version), checks });
        }
    };
    check("open with the given configuration", Ok(()));

    let action = digest("action");
    check(
        "read-entry of an unknown action is not-found",
        match first.read_entry(&action) {
            Ok(None) => Ok(()),
            Ok(Some(e)) => Err(format!("returned {}", show(&e))),
            Err(e) => Err(e.to_string()),
        },
    );
    let entry = Entry { output_id: digest("output"), size: 1234, put_time_ns: now_ns() };
    check("write-entry then read-entry returns it", put_then_get(&mut first, &action, &entry));
    check("write-entry is idempotent", put_then_get(&mut first, &action, &entry));
    let newer = Entry { output_id: digest("output 2"), size: 99, put_time_ns: now_ns() };
    check("write-entry replaces an older entry", put_then_get(&mut first, &action, &newer));

    if stores_bodies {
        for size in [0usize, 1024, 8 << 20] {
            let body: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
            check(&format!("write-body then read-body, {size} bytes"), body_round_trip(&mut first, &body));
        }
        check(
            "read-body of an unknown output is not-found",
            match first.read_body(&digest("no body"), 10, Vec::new()) {
                Ok(Err(())) => Ok(()),
                Ok(Ok(bytes)) => Err(format!("wrote {} bytes", bytes.len())),
                Err(e) => Err(e.to_string()),
            },
        );
    }

    if info.max_instances != 1 {
        let mut second = template.instantiate_open(None).map_err(|e| anyhow::anyhow!("{e:#}"))?;
        let shared_action = digest("shared action");
        let shared = Entry { output_id: digest("shared output"), size: 7, put_time_ns: now_ns() };
        check(
            "an entry written by one instance is read by another",
            first.write_entry(&shared_action, &shared).map_err(|e| e.to_string()).and_then(|()| {
                match second.read_entry(&shared_action) {
                    Ok(Some(e)) if e == shared => Ok(()),
                    Ok(Some(e)) => Err(format!("the second instance read {}", show(&e))),
                    Ok(None) => Err("the second instance says not-found".into()),
                    Err(e) => Err(format!("the second instance: {e}")),
                }
            }),
        );
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let mut instance = template.instantiate_open(None).map_err(|e| anyhow::anyhow!("{e:#}"));
                std::thread::spawn(move || -> Result<(), String> {
                    let instance = instance.as_mut().map_err(|e| e.to_string())?;
                    for n in 0..50 {
                        let a = digest(&format!("thread {t} action {n}"));
                        let e = Entry { output_id: digest(&format!("thread {t} output {n}")), size: n, put_time_ns: 1 };
                        put_then_get(instance, &a, &e)?;
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
        check("finish (second instance)", second.finish().map_err(|e| e.to_string()));
    }
    check("finish", first.finish().map_err(|e| e.to_string()));
    Ok(Report { plugin: format!("{} {}", info.name, info.version), checks })
}

/// An entry as a person reads it: the output id in hex.
fn show(e: &Entry) -> String {
    format!("{{output {}, {} bytes, put at {} ns}}", hex::encode(e.output_id), e.size, e.put_time_ns)
}

fn put_then_get(instance: &mut Instance, action: &[u8; 32], entry: &Entry) -> Result<(), String> {
    instance.write_entry(action, entry).map_err(|e| format!("write-entry: {e}"))?;
    match instance.read_entry(action) {
        Ok(Some(got)) if got == *entry => Ok(()),
        Ok(Some(got)) => Err(format!("wrote {}, read {}", show(entry), show(&got))),
        Ok(None) => Err("read-entry says not-found right after write-entry".into()),
        Err(e) => Err(format!("read-entry: {e}")),
    }
}

fn body_round_trip(instance: &mut Instance, body: &[u8]) -> Result<(), String> {
    let output: [u8; 32] = Sha256::digest(body).into();
    let mut file = tempfile::tempfile().map_err(|e| e.to_string())?;
    file.write_all(body).and_then(|()| std::io::Seek::rewind(&mut file)).map_err(|e| e.to_string())?;
    instance.write_body(&output, body.len() as u64, file).map_err(|e| format!("write-body: {e}"))?;
    match instance.read_body(&output, body.len() as u64, Vec::new()) {
        Ok(Ok(got)) if Sha256::digest(&got).as_slice() == output && got.len() == body.len() => Ok(()),
        Ok(Ok(got)) => Err(format!("read-body gave {} bytes that do not hash to the output id", got.len())),
        Ok(Err(())) => Err("read-body says not-found right after write-body".into()),
        Err(e) => Err(format!("read-body: {e}")),
    }
}
