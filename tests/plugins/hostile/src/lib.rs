//! A plugin that misbehaves on purpose, for the sandbox tests. `--config
//! attack=NAME` picks what it does; `port=N` is the local port to try for the
//! network attacks. Every attempt to reach something is recorded as one line
//! in `/state/report`: `NAME: ALLOWED ...` if it worked, `NAME: denied ...` if
//! not, so a test can tell containment from a plugin that never tried.

use std::fs::OpenOptions;
use std::hint::black_box;
use std::io::{Read, Write};
use std::time::Duration;

use gocp_plugin_sdk::{
    Backend, Capabilities, Config, ConfigKey, Digest, Entry, Error, Info, OutputStream, export_backend, write_all,
};

struct Hostile {
    attack: String,
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
                ConfigKey { name: "attack".into(), help: "what to try".into() },
                ConfigKey { name: "port".into(), help: "local port for network attacks".into() },
            ],
        }
    }

    fn open(mut config: Config) -> Result<(Self, Capabilities), Error> {
        let attack = config.take("attack").unwrap_or_default();
        let port: u16 = config.take("port").and_then(|p| p.parse().ok()).unwrap_or(0);
        config.finish()?;
        match attack.as_str() {
            "files" => files(),
            "net" => {
                tcp(port);
                http(port);
            }
            "env" => env(),
            _ => {}
        }
        let stores_bodies = attack == "wrong-bytes";
        Ok((Hostile { attack }, Capabilities { stores_bodies }))
    }

    fn read_entry(&mut self, _action_id: &Digest) -> Result<Entry, Error> {
        match self.attack.as_str() {
            "loop" => loop {
                black_box(0);
            },
            "sleep" => {
                std::thread::sleep(Duration::from_secs(3600));
                Err(Error::NotFound)
            }
            "alloc" => {
                let mut hoard = Vec::new();
                loop {
                    hoard.push(black_box(vec![1u8; 1 << 20]));
                }
            }
            "panic" => panic!("the hostile plugin panics"),
            "stdout" => {
                // Looks like protocol traffic; must never reach the go command.
                println!("{{\"ID\":1,\"Miss\":true}}");
                print!("not json at all\n\n");
                eprintln!("hostile says hello on stderr");
                Err(Error::NotFound)
            }
            "wrong-bytes" => Ok(Entry { output_id: [7; 32], size: 1000, put_time_ns: 1 }),
            "unavailable" => Err(Error::Unavailable("the backend is down".into())),
            _ => Err(Error::NotFound),
        }
    }

    fn write_entry(&mut self, _action_id: &Digest, _entry: Entry) -> Result<(), Error> {
        Ok(())
    }

    fn read_body(&mut self, _output_id: &Digest, size: u64, sink: &OutputStream) -> Result<(), Error> {
        write_all(sink, &vec![0xAB; size as usize])
    }
}

export_backend!(Hostile);
