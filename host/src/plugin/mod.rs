//! Running cache backend plugins: WebAssembly components of the world in
//! `wit/gocp.wit`.
//!
//! It owns finding a plugin (embedded by name or a file), compiling or loading
//! its compiled form, the sandbox and limits each instance runs under, the
//! typed calls, and the pool of instances on their own threads. It knows
//! nothing of the GOCACHEPROG protocol, and it must never let a plugin's
//! failure escape as anything but a [`CallError`].

mod artifact;
mod bindings;
pub mod conformance;
mod deadline;
pub mod embedded;
pub mod inspect;
mod pool;
mod sandbox;
mod streams;
pub mod text;

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use sha2::Digest as _;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Engine, Store, StoreLimits, Trap, UpdateDeadline};
use wasmtime_wasi::p2::{DynInputStream, DynOutputStream};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

pub use bindings::{Capabilities, Info};
pub use pool::{Body, Pool, ShutdownReport, Watch, Worker};
pub use sandbox::{DirGrant, Grants, NetGrant};

pub type Digest = [u8; 32];

/// How often the engine's epoch advances while a plugin call is running: the
/// resolution of call deadlines.
const TICK: Duration = Duration::from_millis(10);
/// How often it advances while no call is running. The ticker is not woken
/// when a call starts (that would cost a thread wake-up per request), so a
/// call that starts meanwhile gets up to this much more than its budget;
/// budgets are seconds, and an idle helper should not wake 100 times a second
/// through a long build.
const IDLE_TICK: Duration = Duration::from_millis(250);
/// Extra time the first instance's start gets beyond the call timeout before
/// gocp gives up on it and serves without the plugin: the same grace the
/// watchdog gives a stuck call.
const START_GRACE: Duration = Duration::from_secs(1);

/// Where a plugin's code comes from.
#[derive(Debug, Clone)]
pub enum Source {
    Embedded(&'static embedded::EmbeddedPlugin),
    File(PathBuf),
}

impl Source {
    /// `disk`, `memory`, ... name an embedded plugin; anything else is a path.
    pub fn parse(spec: &str) -> Source {
        match embedded::find(spec) {
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
    fn state_dir_name(&self) -> String {
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
    /// byte that moves, see `deadline`).
    pub call_timeout: Duration,
}

/// What the host sees of a plugin entry (a validated `entry`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub output_id: Digest,
    pub size: u64,
    pub put_time_ns: u64,
}

/// A plugin call that did not succeed. `Trap` and `Timeout` mean the instance
/// is gone and will be replaced; the others are the plugin's own answers.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    #[error("backend broken: {0}")]
    Broken(String),
    #[error("plugin failed: {0:#}")]
    Trap(anyhow::Error),
    #[error("plugin call ran out of time after {:.1}s", .0.as_secs_f64())]
    Timeout(Duration),
}

impl CallError {
    /// Whether the failure says the backend cannot be reached or cannot cope,
    /// so that calling it again right away is likely to fail too.
    pub fn is_outage(&self) -> bool {
        matches!(self, CallError::Unavailable(_) | CallError::Trap(_) | CallError::Timeout(_))
    }
}

/// Per-instance host state: the WASI context with the plugin's grants.
pub struct HostState {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    gate: sandbox::HttpGate,
    table: ResourceTable,
    limits: StoreLimits,
    /// The call in progress, for the epoch callback.
    call: Option<deadline::Deadline>,
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

/// Instances of a plugin that talks to the network, unless the user says
/// otherwise: its calls mostly wait on round trips, so the number that keeps a
/// build busy depends on latency, not on cores. Each costs a thread and the
/// plugin's memory (a few MiB for the shipped ones).
pub const NETWORK_INSTANCES: usize = 16;

/// Compiled code and settings shared by every instance of one plugin.
pub struct Template {
    engine: Engine,
    in_flight: InFlight,
    /// Whether the plugin imports wasi:http or wasi:sockets.
    networked: bool,
    pre: bindings::PluginPre<HostState>,
    options: Options,
    sandbox: sandbox::Sandbox,
}

/// One instance of the plugin, with its own memory. Calls into it never overlap.
pub struct Instance {
    store: Store<HostState>,
    plugin: bindings::Plugin,
    timeout: Duration,
    /// Set after a trap or timeout: the instance refuses every later call.
    dead: bool,
    /// Time spent inside plugin calls, for statistics.
    pub busy: Duration,
    /// Lets the pool's watchdog see a call stuck where no deadline reaches.
    watch: Option<Watch>,
    in_flight: InFlight,
    /// Bytes the call in progress moved through its body stream.
    progress: deadline::Progress,
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

/// A loaded plugin: its description, what `open` said, and one instance
/// opened with the user's configuration, ready to run; or, when the plugin
/// could not be started, what to say about it.
pub struct Plugin {
    pub info: Info,
    pub capabilities: Capabilities,
    template: Arc<Template>,
    first: Option<Instance>,
    instances: usize,
    /// Why the plugin could not be started (`open` failed, trapped or hung):
    /// an outage, not the user's mistake, so the session runs without it.
    pub unavailable: Option<String>,
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
            Start::Config(name, msg) => {
                bail!("plugin `{name}`: invalid configuration: {msg}")
            }
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
        Ok(Plugin { info, capabilities, template, first, instances, unavailable })
    }

    /// How many instances [`Plugin::run`] starts.
    pub fn instances(&self) -> usize {
        self.instances
    }

    /// Starts a thread per instance, each running `body` until it returns.
    /// An unavailable plugin gets as many threads, which never start an
    /// instance: they only serve from the local store.
    pub fn run(self, body: Body) -> Pool {
        let usable = self.unavailable.is_none();
        Pool::start(self.template, self.first, self.instances, body, usable)
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
        let started = match starting.instantiate(None) {
            Err(e) => Start::Failed(None, format!("{e:#}")),
            Ok((mut instance, info)) => match instance.open(&starting.options.config) {
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
    // `describe`, then `open`: each has the call timeout.
    let limit = template.options.call_timeout * 2 + START_GRACE;
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| Start::Failed(None, format!("it did not start within {:.1}s", limit.as_secs_f64())))
}

/// Why `open` did not succeed.
pub enum OpenError {
    /// `invalid-config`: the user's mistake, reported as such.
    Config(String),
    Failed(CallError),
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
    fn new(options: Options) -> Result<Template> {
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
        let pre = bindings::PluginPre::new(pre)
            .map_err(|e| anyhow!("not a gocp plugin (it must export gocp:cache/backend@0.1.0): {e:#}"))?;
        let state_dir = options.state_root.join(options.source.state_dir_name());
        let sandbox = sandbox::Sandbox::new(state_dir, options.grants.clone(), options.call_timeout);
        Ok(Template { engine, in_flight, networked, pre, options, sandbox })
    }

    /// A fresh instance, and the plugin's description. With a `watch`,
    /// `describe` already runs under the pool's watchdog.
    pub fn instantiate(&self, watch: Option<Watch>) -> Result<(Instance, Info)> {
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
        store.set_epoch_deadline(ticks(self.options.call_timeout));
        let plugin = self.pre.instantiate(&mut store).map_err(|e| anyhow!("instantiating: {e:#}"))?;
        let mut instance = Instance {
            store,
            plugin,
            timeout: self.options.call_timeout,
            dead: false,
            busy: Duration::ZERO,
            watch,
            in_flight: self.in_flight.clone(),
            progress: deadline::Progress::default(),
        };
        let info = instance.describe().map_err(|e| anyhow!("describe: {e}"))?;
        Ok((instance, info))
    }

    /// A fresh, opened instance to replace one that trapped, watched from
    /// its first call on.
    pub fn instantiate_open(&self, watch: Option<Watch>) -> Result<Instance> {
        let (mut instance, _) = self.instantiate(watch)?;
        instance.open(&self.options.config).map_err(|e| match e {
            OpenError::Config(m) => anyhow!("invalid configuration: {m}"),
            OpenError::Failed(e) => anyhow!("{e}"),
        })?;
        Ok(instance)
    }
}

fn ticks(budget: Duration) -> u64 {
    (budget.as_millis() / TICK.as_millis()) as u64 + 1
}

impl Instance {
    pub fn is_dead(&self) -> bool {
        self.dead
    }

    pub(crate) fn set_watch(&mut self, watch: Watch) {
        self.watch = Some(watch);
    }

    /// Runs one call under its deadline (see `deadline`), timing it. A trap,
    /// a timeout or the memory limit kills the instance (it would refuse
    /// every later call).
    fn call<T>(
        &mut self,
        f: impl FnOnce(&bindings::Plugin, &mut Store<HostState>) -> wasmtime::Result<T>,
    ) -> Result<T, CallError> {
        let deadline = deadline::Deadline::start(self.timeout, &self.progress);
        self.store.set_epoch_deadline(ticks(self.timeout));
        if let Some(watch) = &self.watch {
            watch.arm(deadline.clone());
        }
        self.store.data_mut().call = Some(deadline.clone());
        let in_flight = self.in_flight.enter();
        let result = f(&self.plugin, &mut self.store);
        drop(in_flight);
        self.busy += deadline.elapsed();
        if let Some(watch) = &self.watch {
            watch.disarm();
        }
        self.store.data_mut().call = None;
        result.map_err(|e| {
            self.dead = true;
            if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
                CallError::Timeout(deadline.elapsed())
            } else {
                CallError::Trap(e.into())
            }
        })
    }

    /// What the plugin says it is, with its name and version safe to print
    /// (they appear in messages and statistics).
    fn describe(&mut self) -> Result<Info, CallError> {
        let mut info = self.call(|p, s| p.gocp_cache_backend().call_describe(s))?;
        info.name = text::one_line(&info.name);
        info.version = text::one_line(&info.version);
        Ok(info)
    }

    fn open(&mut self, config: &[(String, String)]) -> Result<Capabilities, OpenError> {
        match self.call(|p, s| p.gocp_cache_backend().call_open(s, config)) {
            Ok(Ok(caps)) => Ok(caps),
            Ok(Err(bindings::Error::InvalidConfig(m))) => Err(OpenError::Config(text::one_line(&m))),
            Ok(Err(e)) => Err(OpenError::Failed(plugin_error(e))),
            Err(e) => Err(OpenError::Failed(e)),
        }
    }

    /// The entry for `action_id`: `Ok(None)` is an ordinary miss.
    pub fn read_entry(&mut self, action_id: &Digest) -> Result<Option<Entry>, CallError> {
        let id = action_id.to_vec();
        match self.call(|p, s| p.gocp_cache_backend().call_read_entry(s, &id))? {
            Ok(e) => {
                let output_id = e.output_id.as_slice().try_into().map_err(|_| {
                    CallError::Broken(format!("read-entry returned an output id of {} bytes", e.output_id.len()))
                })?;
                Ok(Some(Entry { output_id, size: e.size, put_time_ns: e.put_time_ns }))
            }
            Err(bindings::Error::NotFound) => Ok(None),
            Err(e) => Err(plugin_error(e)),
        }
    }

    /// Has the plugin write the body of `output_id` into `writer`, refusing
    /// more than `size` bytes. `Ok(Err(()))` means the plugin does not have
    /// it. The caller verifies what was written.
    pub fn read_body<W: Write + Send + 'static>(
        &mut self,
        output_id: &Digest,
        size: u64,
        writer: W,
    ) -> Result<Result<W, ()>, CallError> {
        let (sink, target) = streams::BodySink::new(writer, size, self.progress.clone());
        let sink: DynOutputStream = Box::new(sink);
        let handle = self.store.data_mut().table.push(sink).map_err(|e| CallError::Trap(e.into()))?;
        let borrowed = wasmtime::component::Resource::new_borrow(handle.rep());
        let id = output_id.to_vec();
        let result = self.call(|p, s| p.gocp_cache_backend().call_read_body(s, &id, size, borrowed));
        let _ = self.store.data_mut().table.delete(handle);
        let outcome = result?;
        let target = Arc::into_inner(target).expect("the sink was dropped with the table entry").into_inner().unwrap();
        match outcome {
            Ok(()) if target.failed.is_none() => Ok(Ok(target.writer)),
            Ok(()) => Err(CallError::Broken(target.failed.unwrap_or_default())),
            Err(bindings::Error::NotFound) => Ok(Err(())),
            Err(e) => Err(plugin_error(e)),
        }
    }

    /// Hands the plugin a stored body, readable from `file`.
    pub fn write_body(&mut self, output_id: &Digest, size: u64, file: File) -> Result<(), CallError> {
        let source: DynInputStream = Box::new(streams::FileSource::new(file, self.progress.clone()));
        let handle = self.store.data_mut().table.push(source).map_err(|e| CallError::Trap(e.into()))?;
        let borrowed = wasmtime::component::Resource::new_borrow(handle.rep());
        let id = output_id.to_vec();
        let result = self.call(|p, s| p.gocp_cache_backend().call_write_body(s, &id, size, borrowed));
        let _ = self.store.data_mut().table.delete(handle);
        result?.map_err(plugin_error)
    }

    pub fn write_entry(&mut self, action_id: &Digest, entry: &Entry) -> Result<(), CallError> {
        let wire =
            bindings::Entry { output_id: entry.output_id.to_vec(), size: entry.size, put_time_ns: entry.put_time_ns };
        let id = action_id.to_vec();
        self.call(|p, s| p.gocp_cache_backend().call_write_entry(s, &id, &wire))?.map_err(plugin_error)
    }

    pub fn finish(&mut self) -> Result<(), CallError> {
        self.call(|p, s| p.gocp_cache_backend().call_finish(s))?.map_err(plugin_error)
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
