//! Running cache backends that are WebAssembly components of the world in
//! `wit/gocp.wit`: the plugin runtime, which implements `backend::Backend`.
//!
//! It owns finding a plugin (built in by name, or a file: `builtin`),
//! compiling or loading its compiled form (`artifact`), the sandbox and
//! limits each instance runs under (`sandbox`), the WASI streams bodies cross
//! (`streams`), and the typed calls into an instance under their deadlines,
//! which it enforces inside WebAssembly code through epoch interruption (the
//! serving core's watchdog catches what blocks in the host). It knows nothing
//! of the GOCACHEPROG protocol, and must never let a plugin's failure escape
//! as anything but a [`CallError`].

mod artifact;
mod bindings;
pub mod builtin;
mod egress;
mod sandbox;
mod streams;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use sha2::Digest as _;
use wasmtime::component::{Component, Linker, Resource, ResourceTable};
use wasmtime::{Engine, Store, StoreLimits, Trap, UpdateDeadline};
use wasmtime_wasi::p2::{DynInputStream, DynOutputStream};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use crate::backend::{self, BodySink, BodySource, CallError, Deadline, Digest, Entry, Progress, ReadBody, StoredEntry};
use crate::text;

pub use bindings::{Capabilities, ConfigKey, Info};
pub use sandbox::{DirGrant, Grants, NetGrant};

/// How often the engine's epoch advances while a plugin call is running: the
/// resolution of call deadlines.
const TICK: Duration = Duration::from_millis(10);
/// How often it advances while no call is running. The ticker is not woken
/// when a call starts (that would cost a thread wake-up per request), so a
/// call that starts meanwhile gets up to this much more than its budget;
/// budgets are seconds, and an idle helper should not wake 100 times a second
/// through a long build.
const IDLE_TICK: Duration = Duration::from_millis(250);
/// Extra time the first instance's start gets beyond its deadline before
/// gocp gives up on it and serves without the plugin: the same grace the
/// watchdog gives a stuck call.
const START_GRACE: Duration = Duration::from_secs(1);

/// Instances of a plugin that talks to the network, unless the user says
/// otherwise: its calls mostly wait on round trips, so the number that keeps a
/// build busy depends on latency, not on cores. Each costs a thread and the
/// plugin's memory (a few MiB for the shipped ones). On a 20 ms link, a warm
/// `go build std` from an HTTP cache took 1.3-1.7 s with 16 and 1.0-1.3 s
/// with 32 (48 was no better): prefetching keeps all but two of them busy.
pub const NETWORK_INSTANCES: usize = 32;

/// Where a plugin's code comes from.
#[derive(Debug, Clone)]
pub enum Source {
    Embedded(&'static builtin::Builtin),
    File(PathBuf),
}

impl Source {
    /// `disk`, `memory`, ... name an embedded plugin; anything else is a path.
    pub fn parse(spec: &str) -> Source {
        match builtin::find(spec) {
            Some(p) if !spec.contains('/') => Source::Embedded(p),
            _ => Source::File(PathBuf::from(spec)),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Source::Embedded(p) => format!("built-in plugin `{}`", p.name),
            Source::File(p) => p.display().to_string(),
        }
    }

    /// The directory under the state root that holds the plugin's `/state`:
    /// named after the plugin file, so that its data survives upgrades of it.
    pub fn state_dir_name(&self) -> String {
        let name = match self {
            Source::Embedded(p) => p.name.to_string(),
            Source::File(path) => path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
        };
        let s: String =
            name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
        if s.is_empty() { "plugin".into() } else { s }
    }

    /// The wasm bytes and their SHA-256.
    fn load(&self) -> Result<(std::borrow::Cow<'static, [u8]>, [u8; 32])> {
        Ok(match self {
            Source::Embedded(p) => (p.wasm.into(), p.sha256),
            Source::File(path) => {
                let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
                let sha = sha2::Sha256::digest(&bytes).into();
                (bytes.into(), sha)
            }
        })
    }
}

/// Everything needed to start instances of a plugin.
#[derive(Debug, Clone)]
pub struct Options {
    pub source: Source,
    pub config: Vec<(String, String)>,
    /// Where compiled plugins are kept between runs.
    pub artifact_dir: PathBuf,
    /// Parent of each plugin's private directory (preopened as `/state`).
    pub state_root: PathBuf,
    pub grants: Grants,
    /// Upper bound on instances; the plugin's own `max-instances` may lower
    /// it. `None`: as many as there are CPUs, or [`NETWORK_INSTANCES`] for a
    /// plugin that imports network interfaces.
    pub max_instances: Option<usize>,
    /// How long one call may take (calls moving a body get more for every
    /// byte that moves, see `backend::deadline`); also the longest a wasi:http
    /// request may wait to connect or between bytes.
    pub call_timeout: Duration,
    /// PEM files of CA certificates that wasi:http's TLS trusts besides the
    /// system's.
    pub ca_files: Vec<PathBuf>,
}

/// Per-instance host state: the WASI context with the plugin's grants.
pub struct HostState {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    gate: sandbox::HttpGate,
    table: ResourceTable,
    limits: StoreLimits,
    /// The call in progress, for the epoch callback.
    call: Option<Deadline>,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl WasiHttpView for HostState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView { ctx: &mut self.http, table: &mut self.table, hooks: &mut self.gate }
    }
}

/// Compiled code and settings shared by every instance of one plugin.
pub struct Template {
    engine: Engine,
    in_flight: InFlight,
    /// Whether the plugin imports wasi:http or wasi:sockets.
    networked: bool,
    /// The interfaces it imports, by name.
    pub imports: Vec<String>,
    pre: bindings::Pre<HostState>,
    pub options: Options,
    sandbox: sandbox::Sandbox,
}

/// One instance of the plugin, with its own memory. Calls into it never overlap.
pub struct Instance {
    store: Store<HostState>,
    plugin: bindings::Exports,
    in_flight: InFlight,
}

/// Plugin calls running now, across all instances: what tells the epoch
/// ticker whether to tick fast.
#[derive(Clone, Default)]
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn enter(&self) -> InFlightGuard<'_> {
        self.0.fetch_add(1, Ordering::Relaxed);
        InFlightGuard(self)
    }

    fn any(&self) -> bool {
        self.0.load(Ordering::Relaxed) > 0
    }
}

/// Counts a call as running until dropped, however the call ends.
struct InFlightGuard<'a>(&'a InFlight);

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        self.0.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why `open` did not succeed.
pub enum OpenError {
    /// `invalid-config`: the user's mistake, reported as such.
    Config(String),
    Failed(CallError),
}

/// A loaded plugin, as a backend: its description, what `open` said, and
/// the instance opened at load, handed out first; or, when the plugin could
/// not be started, what to say about it.
pub struct Plugin {
    pub info: Info,
    pub capabilities: Capabilities,
    label: String,
    template: Arc<Template>,
    first: Mutex<Option<Instance>>,
    instances: usize,
    unavailable: Option<String>,
}

/// How starting the first instance ended.
enum Start {
    Opened(Instance, Info, Capabilities),
    /// `invalid-config`, with the plugin's name.
    Config(String, String),
    /// Anything else, with the description if `describe` got that far.
    Failed(Option<Info>, String),
}

impl Plugin {
    /// Loads the plugin, starts one instance and opens it with the user's
    /// configuration: every configuration mistake surfaces here, before the
    /// go command is answered. A plugin that fails to start for any other
    /// reason (an outage, a trap, a call that never returns) is loaded as
    /// unavailable rather than failing the build.
    pub fn load(options: Options) -> Result<Plugin> {
        let what = options.source.describe();
        let template = Arc::new(Template::new(options).with_context(|| format!("plugin {what}"))?);
        let (first, info, capabilities, unavailable) = match start_first(&template) {
            Start::Opened(instance, info, caps) => (Some(instance), info, caps, None),
            Start::Config(name, msg) => bail!("plugin `{name}`: invalid configuration: {msg}"),
            Start::Failed(info, why) => {
                let info = info.unwrap_or_else(|| Info {
                    name: template.options.source.state_dir_name(),
                    version: "?".into(),
                    summary: String::new(),
                    max_instances: 0,
                    config_keys: Vec::new(),
                });
                // The local tier keeps what this session stores, whatever the plugin would have said.
                (None, info, Capabilities { stores_bodies: true }, Some(why))
            }
        };
        let limit = template.options.max_instances.unwrap_or_else(|| {
            if template.networked {
                NETWORK_INSTANCES
            } else {
                std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2)
            }
        });
        let instances = match info.max_instances {
            0 => limit,
            n => (n as usize).min(limit),
        }
        .max(1);
        let label = format!("{} {}", info.name, info.version);
        Ok(Plugin { info, capabilities, label, template, first: Mutex::new(first), instances, unavailable })
    }
}

impl Plugin {
    /// The contract the plugin was built for, e.g. `gocp:cache@0.2.0`.
    pub fn contract(&self) -> &'static str {
        self.template.contract()
    }

    /// Whether entries keep the host's data (signatures) through this plugin.
    pub fn carries_host_data(&self) -> bool {
        self.template.carries_host_data()
    }

    /// Whether it reaches the network (imports wasi:http or wasi:sockets).
    pub fn networked(&self) -> bool {
        self.template.networked
    }
}

impl backend::Backend for Plugin {
    fn label(&self) -> &str {
        &self.label
    }

    fn name(&self) -> &str {
        &self.info.name
    }

    fn stores_bodies(&self) -> bool {
        self.capabilities.stores_bodies
    }

    fn instances(&self) -> usize {
        self.instances
    }

    fn carries_host_data(&self) -> bool {
        Plugin::carries_host_data(self)
    }

    fn unavailable(&self) -> Option<&str> {
        self.unavailable.as_deref()
    }

    fn start(&self, deadline: &Deadline) -> Result<Box<dyn backend::Instance>, CallError> {
        if let Some(first) = self.first.lock().unwrap().take() {
            return Ok(Box::new(first));
        }
        let instance = self.template.instantiate_open(deadline).map_err(|e| match e {
            OpenError::Config(m) => CallError::Broken(format!("invalid configuration: {m}")),
            OpenError::Failed(e) => e,
        })?;
        Ok(Box::new(instance))
    }

    fn network(&self) -> backend::Network {
        self.template.sandbox.network()
    }
}

/// Starts the first instance on a thread of its own, so that a plugin whose
/// `describe` or `open` blocks inside the host (where epoch deadlines do not
/// reach) costs the go command one timeout, not its whole build. A thread
/// that never returns is left behind.
fn start_first(template: &Arc<Template>) -> Start {
    let (tx, rx) = crossbeam_channel::bounded(1);
    let starting = template.clone();
    let spawned = std::thread::Builder::new().name("plugin-start".into()).spawn(move || {
        let deadline = Deadline::start(starting.options.call_timeout, &Progress::default());
        let started = match starting.instantiate(&deadline) {
            Err(e) => Start::Failed(None, format!("{e:#}")),
            Ok((mut instance, info)) => match instance.open(&starting.options.config, &deadline) {
                Ok(caps) => Start::Opened(instance, info, caps),
                Err(OpenError::Config(msg)) => Start::Config(info.name, msg),
                Err(OpenError::Failed(e)) => Start::Failed(Some(info), format!("open: {e}")),
            },
        };
        let _ = tx.send(started);
    });
    if let Err(e) = spawned {
        return Start::Failed(None, format!("starting a thread: {e}"));
    }
    let limit = template.options.call_timeout + START_GRACE;
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| Start::Failed(None, format!("it did not start within {:.1}s", limit.as_secs_f64())))
}

/// WASI interfaces whose calls wasmtime-wasi runs through its tokio runtime.
const ON_TOKIO: [&str; 3] = ["wasi:filesystem/", "wasi:sockets/", "wasi:http/"];

/// The engine every plugin runs on: Cranelift, with epoch interruption so
/// that a call running too long can be stopped, and a ticker advancing the
/// epoch for as long as the engine lives (every `TICK` while `in_flight` has
/// a call, every `IDLE_TICK` otherwise).
fn engine(in_flight: InFlight) -> Result<Engine> {
    let mut config = wasmtime::Config::new();
    config.cranelift_opt_level(wasmtime::OptLevel::Speed);
    config.epoch_interruption(true);
    let engine = Engine::new(&config).map_err(|e| anyhow!("setting up the WebAssembly engine: {e}"))?;
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("epoch".into())
        .spawn(move || {
            while let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(if in_flight.any() { TICK } else { IDLE_TICK });
            }
        })
        .context("starting the epoch thread")?;
    Ok(engine)
}

/// Compiles (or loads the compiled form of) a plugin's component.
fn component(engine: &Engine, source: &Source, artifact_dir: &std::path::Path) -> Result<Component> {
    let (wasm, sha) = source.load()?;
    artifact::load(engine, &wasm, &sha, artifact_dir)
}

impl Template {
    /// Compiles (or loads) the plugin and links what it imports; nothing runs yet.
    pub fn new(options: Options) -> Result<Template> {
        let in_flight = InFlight::default();
        let engine = engine(in_flight.clone())?;
        // Loading the component and defining WASI are independent and each
        // takes a few hundred microseconds of every start: side by side.
        let (component, linker) = std::thread::scope(|scope| {
            let linking = scope.spawn(|| {
                let mut linker = Linker::<HostState>::new(&engine);
                wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map(|_| linker)
            });
            (component(&engine, &options.source, &options.artifact_dir), linking.join())
        });
        let component = component?;
        let mut linker =
            linker.map_err(|_| anyhow!("linking WASI panicked"))?.map_err(|e| anyhow!("linking WASI: {e}"))?;
        sandbox::gate_name_lookups(&mut linker)?;
        let imports: Vec<String> =
            component.component_type().imports(&engine).map(|(name, _)| name.to_string()).collect();
        if imports.iter().any(|name| ON_TOKIO.iter().any(|prefix| name.starts_with(prefix))) {
            // wasmtime-wasi creates that runtime on first use (worker threads,
            // epoll: about 0.3 ms here): have it made while the first instance
            // starts rather than inside the plugin's first call. Plugins that
            // import none of these never pay for it. A thread that cannot
            // start only loses the head start.
            let _ = std::thread::Builder::new()
                .name("wasi-runtime".into())
                .spawn(|| wasmtime_wasi::runtime::in_tokio(async {}));
        }
        let networked = imports.iter().any(|name| name.starts_with("wasi:http/") || name.starts_with("wasi:sockets/"));
        // Defining wasi:http costs start-up time on every run: only for those who use it.
        if imports.iter().any(|name| name.starts_with("wasi:http/")) {
            wasmtime_wasi_http::p2::add_only_http_to_linker_sync(&mut linker)
                .map_err(|e| anyhow!("linking WASI HTTP: {e}"))?;
        }
        let pre =
            linker.instantiate_pre(&component).map_err(|e| anyhow!("it needs imports gocp does not provide: {e:#}"))?;
        let pre = bindings::Pre::new(pre)?;
        let state_dir = options.state_root.join(options.source.state_dir_name());
        let egress = Arc::new(egress::Egress::new(&options.ca_files)?);
        let sandbox = sandbox::Sandbox::new(state_dir, options.grants.clone(), options.call_timeout, egress);
        Ok(Template { engine, in_flight, networked, imports, pre, options, sandbox })
    }

    /// The contract the plugin was built for, e.g. `gocp:cache@0.2.0`.
    pub fn contract(&self) -> &'static str {
        self.pre.contract()
    }

    /// Whether entries keep the host's data through this plugin.
    pub fn carries_host_data(&self) -> bool {
        self.pre.carries_host_data()
    }

    /// A fresh instance, and the plugin's description (`describe` within `deadline`).
    pub fn instantiate(&self, deadline: &Deadline) -> Result<(Instance, Info)> {
        let state = HostState {
            wasi: self.sandbox.wasi()?,
            http: WasiHttpCtx::new(),
            gate: self.sandbox.http_gate(),
            table: ResourceTable::new(),
            limits: self.sandbox.limits(),
            call: None,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        // Reached only while WebAssembly code runs: extends the call while
        // its deadline allows, else stops it as a timeout.
        store.epoch_deadline_callback(|ctx| {
            let left = ctx.data().call.as_ref().and_then(|d| d.remaining(Instant::now()));
            Ok(left.map_or(UpdateDeadline::Interrupt, |left| UpdateDeadline::Continue(ticks(left))))
        });
        store.data_mut().call = Some(deadline.clone());
        store.set_epoch_deadline(ticks(deadline.remaining(Instant::now()).unwrap_or_default()));
        let plugin = self.pre.instantiate(&mut store).map_err(|e| anyhow!("instantiating: {e:#}"))?;
        let mut instance = Instance { store, plugin, in_flight: self.in_flight.clone() };
        let info = instance.describe(deadline).map_err(|e| anyhow!("describe: {e}"))?;
        Ok((instance, info))
    }

    /// A fresh instance opened with the user's configuration, within `deadline`.
    pub fn instantiate_open(&self, deadline: &Deadline) -> Result<Instance, OpenError> {
        let (mut instance, _) = self.instantiate(deadline).map_err(|e| OpenError::Failed(CallError::Trap(e)))?;
        instance.open(&self.options.config, deadline)?;
        Ok(instance)
    }
}

fn ticks(budget: Duration) -> u64 {
    (budget.as_millis() / TICK.as_millis()) as u64 + 1
}

impl Instance {
    /// Runs one call within `deadline`, which the epoch callback enforces
    /// while the plugin's code runs. A trap, a timeout or the memory limit
    /// leaves the instance unable to take another call; the caller replaces it.
    fn call<T>(
        &mut self,
        deadline: &Deadline,
        f: impl FnOnce(&bindings::Exports, &mut Store<HostState>) -> wasmtime::Result<T>,
    ) -> Result<T, CallError> {
        let left = deadline.remaining(Instant::now()).unwrap_or_default();
        self.store.set_epoch_deadline(ticks(left));
        self.store.data_mut().call = Some(deadline.clone());
        let in_flight = self.in_flight.enter();
        let result = f(&self.plugin, &mut self.store);
        drop(in_flight);
        self.store.data_mut().call = None;
        result.map_err(|e| {
            if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
                CallError::Timeout(deadline.elapsed())
            } else {
                CallError::Trap(e.into())
            }
        })
    }

    /// What the plugin says it is, with its name and version safe to print
    /// (they appear in messages and statistics).
    fn describe(&mut self, deadline: &Deadline) -> Result<Info, CallError> {
        let mut info = self.call(deadline, |p, s| p.describe(s))?;
        info.name = text::one_line(&info.name);
        info.version = text::one_line(&info.version);
        Ok(info)
    }

    /// Opens the instance with `config`.
    pub fn open(&mut self, config: &[(String, String)], deadline: &Deadline) -> Result<Capabilities, OpenError> {
        match self.call(deadline, |p, s| p.open(s, config)) {
            Ok(Ok(caps)) => Ok(caps),
            Ok(Err(bindings::Error::InvalidConfig(m))) => Err(OpenError::Config(text::one_line(&m))),
            Ok(Err(e)) => Err(OpenError::Failed(plugin_error(e))),
            Err(e) => Err(OpenError::Failed(e)),
        }
    }
}

impl backend::Instance for Instance {
    fn read_entry(&mut self, action_id: &Digest, deadline: &Deadline) -> Result<Option<StoredEntry>, CallError> {
        match self.call(deadline, |p, s| p.read_entry(s, action_id))? {
            Ok(e) => {
                let output_id = e.output_id.as_slice().try_into().map_err(|_| {
                    CallError::Broken(format!("read-entry returned an output id of {} bytes", e.output_id.len()))
                })?;
                let entry = Entry { output_id, size: e.size, put_time_ns: e.put_time_ns };
                Ok(Some(StoredEntry { entry, host_data: e.host_data }))
            }
            Err(bindings::Error::NotFound) => Ok(None),
            Err(e) => Err(plugin_error(e)),
        }
    }

    fn read_body(
        &mut self,
        output_id: &Digest,
        size: u64,
        sink: BodySink,
        deadline: &Deadline,
    ) -> Result<ReadBody, CallError> {
        let (stream, sink) = streams::WriteStream::new(sink);
        let stream: DynOutputStream = Box::new(stream);
        let handle = self.store.data_mut().table.push(stream).map_err(|e| CallError::Trap(e.into()))?;
        let borrowed = Resource::new_borrow(handle.rep());
        let result = self.call(deadline, |p, s| p.read_body(s, output_id, size, borrowed));
        let _ = self.store.data_mut().table.delete(handle);
        let sink = sink.take().expect("the sink is handed back only here");
        match result? {
            Ok(()) => Ok(ReadBody::Written(sink)),
            Err(bindings::Error::NotFound) => Ok(ReadBody::NotFound),
            Err(e) => Err(plugin_error(e)),
        }
    }

    fn write_body(
        &mut self,
        output_id: &Digest,
        size: u64,
        source: BodySource,
        deadline: &Deadline,
    ) -> Result<(), CallError> {
        let stream: DynInputStream = Box::new(streams::ReadStream::new(source));
        let handle = self.store.data_mut().table.push(stream).map_err(|e| CallError::Trap(e.into()))?;
        let borrowed = Resource::new_borrow(handle.rep());
        let result = self.call(deadline, |p, s| p.write_body(s, output_id, size, borrowed));
        let _ = self.store.data_mut().table.delete(handle);
        result?.map_err(plugin_error)
    }

    fn write_entry(&mut self, action_id: &Digest, stored: &StoredEntry, deadline: &Deadline) -> Result<(), CallError> {
        let entry = &stored.entry;
        let wire = bindings::WireEntry {
            output_id: entry.output_id.to_vec(),
            size: entry.size,
            put_time_ns: entry.put_time_ns,
            host_data: stored.host_data.clone(),
        };
        self.call(deadline, |p, s| p.write_entry(s, action_id, &wire))?.map_err(plugin_error)
    }

    fn finish(&mut self, deadline: &Deadline) -> Result<(), CallError> {
        self.call(deadline, |p, s| p.finish(s))?.map_err(plugin_error)
    }
}

/// A plugin's error as the host keeps it: its text made safe to print.
fn plugin_error(e: bindings::Error) -> CallError {
    match e {
        bindings::Error::NotFound => CallError::Broken("not-found where it has no meaning".into()),
        bindings::Error::Unavailable(m) => CallError::Unavailable(text::one_line(&m)),
        bindings::Error::Broken(m) => CallError::Broken(text::one_line(&m)),
        bindings::Error::InvalidConfig(m) => {
            CallError::Broken(format!("invalid-config outside open: {}", text::one_line(&m)))
        }
    }
}
