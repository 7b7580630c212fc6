//! `--help-plugin`: what a plugin is, how to configure it, what it imports and
//! which grants those imports need, read from the component itself.
//!
//! It owns only that description; it never opens the plugin with any
//! configuration and grants it nothing.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::backend::{Deadline, Progress};
use crate::plugin::{Grants, Options, Source, Template};
use crate::text;

/// What each kind of import lets a plugin do, and what the user must grant.
fn grant_for(import: &str) -> &'static str {
    let name = import.split('@').next().unwrap_or(import);
    match name {
        "wasi:filesystem/types" | "wasi:filesystem/preopens" => {
            "files: its own /state directory; more only with --allow-dir HOST[:GUEST][:ro]"
        }
        "wasi:sockets/tcp"
        | "wasi:sockets/tcp-create-socket"
        | "wasi:sockets/network"
        | "wasi:sockets/instance-network"
        | "wasi:sockets/ip-name-lookup" => "network: only peers granted with --allow-net HOST:PORT",
        "wasi:sockets/udp" | "wasi:sockets/udp-create-socket" => "UDP: never granted",
        "wasi:http/outgoing-handler" | "wasi:http/types" => "HTTP: only hosts granted with --allow-net HOST:PORT",
        "wasi:cli/environment" => "environment: only variables granted with --allow-env NAME",
        "wasi:cli/stderr" => "stderr: shown with --verbose, prefixed with the plugin's name",
        "wasi:cli/stdout" => "stdout: discarded",
        _ => "no grant needed",
    }
}

pub fn describe(source: &Source, artifact_dir: &Path, state_root: &Path) -> Result<String> {
    let options = Options {
        source: source.clone(),
        config: Vec::new(),
        artifact_dir: artifact_dir.to_path_buf(),
        state_root: state_root.to_path_buf(),
        grants: Grants { dirs: Vec::new(), env: Vec::new(), net: Vec::new(), memory: 1 << 30, stderr_prefix: None },
        max_instances: Some(1),
        call_timeout: Duration::from_secs(10),
        ca_files: Vec::new(),
    };
    let what = source.describe();
    let template = Template::new(options).with_context(|| format!("plugin {what}"))?;
    let deadline = Deadline::start(Duration::from_secs(10), &Progress::default());
    let (_, info) = template.instantiate(&deadline).with_context(|| format!("plugin {what}"))?;

    let mut out = String::new();
    // The plugin's own words, made safe to print like all its text.
    writeln!(out, "{} {}: {}", info.name, info.version, text::one_line(&info.summary))?;
    writeln!(out, "source: {what}")?;
    let instances = match info.max_instances {
        0 => "any number at once (its state lives outside the instance)".to_string(),
        1 => "one (it keeps its state in its own memory)".to_string(),
        n => format!("at most {n} at once"),
    };
    writeln!(out, "instances: {instances}")?;
    writeln!(out, "\nconfiguration (--config KEY=VALUE):")?;
    if info.config_keys.is_empty() {
        writeln!(out, "  none")?;
    }
    let width = info.config_keys.iter().map(|k| k.name.len()).max().unwrap_or(0);
    for key in &info.config_keys {
        writeln!(out, "  {:width$}  {}", text::one_line(&key.name), text::one_line(&key.help))?;
    }
    writeln!(out, "\nimports, and the grants they need:")?;
    let mut imports = template.imports.clone();
    imports.sort();
    let width = imports.iter().map(String::len).max().unwrap_or(0);
    for import in &imports {
        writeln!(out, "  {import:width$}  {}", grant_for(import))?;
    }
    Ok(out)
}
