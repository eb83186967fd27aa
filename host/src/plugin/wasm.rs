//! WASM component plugins on wasmtime: the engine (its epoch ticker is [`super::epoch`]),
//! capability-gated linking, a pool of reusable instances per plugin version, and the host
//! functions, which only record effects.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use wasmtime::component::{Component, HasSelf, InstancePre, Linker, ResourceTable};
use wasmtime::{Engine, ResourceLimiter, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::epoch::EpochTicker;
use super::stdio::{self, LogStdio, Which};
use super::{CallInput, CallOutput, PluginEnv};
use crate::effects::{
    self, Effect, LogLevel, MAX_EFFECT_BYTES_PER_CALL, MAX_EFFECTS_PER_CALL, MAX_KV_KEY_BYTES,
    MAX_KV_VALUE_BYTES, RequestTo,
};
use crate::error::CallError;
use crate::manifest::HostCap;

mod bindings {
    wasmtime::component::bindgen!({
        path: "../plugin-sdk/wit",
        world: "plugin",
        // The message handed to a plugin borrows the host's strings: no copies before lowering.
        ownership: Borrowing { duplicate_if_necessary: true },
    });
}

use bindings::plexus::plugin::{config, identity, kv, logging, messaging, rooms, timers, types};

/// How often the epoch advances; call deadlines are counted in these ticks.
const EPOCH_TICK: Duration = Duration::from_millis(5);
/// Instances kept warm per plugin version.
const POOL_MAX: usize = 16;
/// The largest buffer for packing messages an idle instance keeps.
const PACKED_KEEP: usize = 16 << 10;
/// An instance whose linear memory grew past this share of its limit is not reused.
const RECYCLE_MEMORY_SHARE: f64 = 0.5;

/// The wasmtime engine shared by all plugins of a host, with its epoch ticker.
#[derive(Clone)]
pub struct Runtime {
    engine: Engine,
    /// Shared with every plugin loaded on this runtime; its thread stops when the last goes.
    ticker: Arc<EpochTicker>,
}

impl Runtime {
    pub fn new() -> anyhow::Result<Runtime> {
        let mut config = wasmtime::Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        config.concurrency_support(false);
        let engine = Engine::new(&config).map_err(wasm_err)?;
        let ticker = Arc::new(EpochTicker::start(&engine, EPOCH_TICK)?);
        Ok(Runtime { engine, ticker })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Compiles a component (slow: run it off the hot path).
    pub fn compile(&self, bytes: &[u8]) -> anyhow::Result<Component> {
        Component::from_binary(&self.engine, bytes).map_err(wasm_err)
    }
}

/// Converts wasmtime's error type, keeping its whole chain of causes.
fn wasm_err(e: wasmtime::Error) -> anyhow::Error {
    anyhow::Error::msg(format!("{e:#}"))
}

/// The host interfaces of the `plexus:plugin` package and the capability each needs.
fn capability_of(import: &str) -> Option<HostCap> {
    let name = import.strip_prefix("plexus:plugin/")?;
    let name = name.split('@').next()?;
    HostCap::ALL.into_iter().find(|c| c.name() == name)
}

/// The version of the `plexus:plugin` package this host provides (`plugin-sdk/wit/plexus.wit`).
pub const INTERFACE_VERSION: &str = "0.3.4";

/// A `major.minor.patch` version.
type Semver = (u64, u64, u64);

fn parse_semver(v: &str) -> Option<Semver> {
    let mut parts = v.split('.').map(|p| p.parse::<u64>().ok());
    let version = (parts.next()??, parts.next()??, parts.next()??);
    parts.next().is_none().then_some(version)
}

/// How a plugin's `plexus:plugin` version relates to this host's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compat {
    /// The same version, or an earlier one on the same compatible track: linked.
    Runs,
    /// A later version on the same track: it may import what this host lacks.
    Newer,
    /// Another track (a breaking change between them), or not a version.
    Incompatible,
}

/// The semver rule of Cargo and wasmtime: versions are on one compatible track when their
/// major numbers match and, while the major is 0, their minor numbers too.
fn compat(built: &str) -> Compat {
    let (Some(b), Some(h)) = (parse_semver(built), parse_semver(INTERFACE_VERSION)) else {
        return Compat::Incompatible;
    };
    let same_track = b.0 == h.0 && (h.0 != 0 || b.1 == h.1);
    match (same_track, b <= h) {
        (true, true) => Compat::Runs,
        (true, false) => Compat::Newer,
        (false, _) => Compat::Incompatible,
    }
}

/// The `plexus:plugin` version an import names, if it is a Plexus import with a version.
fn interface_version(import: &str) -> Option<&str> {
    let (_, version) = import.strip_prefix("plexus:plugin/")?.split_once('@')?;
    Some(version)
}

/// Why a component was refused at load.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "was built against plexus:plugin@{built}, which this host (plexus:plugin@{INTERFACE_VERSION}) cannot run: the interface changed incompatibly between them; rebuild it with a plugin-sdk of this host's version"
    )]
    Incompatible { built: String },
    #[error(
        "was built against plexus:plugin@{built}, newer than this host's plexus:plugin@{INTERFACE_VERSION}; upgrade the host, or rebuild the plugin with this host's plugin-sdk"
    )]
    Newer { built: String },
    #[error("imports `{import}`, which needs capability `{cap}`; grant it in [capabilities] host")]
    NotGranted { import: String, cap: &'static str },
    #[error("imports `{0}`, which this host does not provide")]
    UnknownImport(String),
    #[error("is not a Plexus plugin: {0}")]
    NotAPlugin(String),
}

/// Store data of one plugin instance.
pub struct PluginState {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: MemoryLimiter,
    env: Arc<PluginEnv>,
    /// The component's handler names: timers and requests must name one of them.
    handlers: Arc<[String]>,
    effects: Vec<Effect>,
    logs: Vec<(LogLevel, String)>,
    /// Why this call's effects are refused (the first reason), if they are.
    refused: Option<String>,
    /// The bytes this call's effects carry.
    effect_bytes: usize,
    /// The keys this call read from the plugin's store, with the version first seen.
    reads: std::collections::HashMap<String, u64>,
    /// The packed text of the message being handed over, kept to reuse its allocation.
    packed: String,
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl PluginState {
    fn record(&mut self, effect: Effect) {
        if self.refused.is_some() {
            return;
        }
        self.effect_bytes += effect.size();
        if self.effects.len() >= MAX_EFFECTS_PER_CALL {
            self.refuse(format!(
                "more than {MAX_EFFECTS_PER_CALL} effects in one call"
            ));
        } else if self.effect_bytes > MAX_EFFECT_BYTES_PER_CALL {
            self.refuse(format!(
                "effects of more than {MAX_EFFECT_BYTES_PER_CALL} bytes in one call"
            ));
        } else {
            self.effects.push(effect);
        }
    }

    /// Refuses this call's effects: the call fails with `reason` (the first one given).
    fn refuse(&mut self, reason: String) {
        self.refused.get_or_insert(reason);
    }

    fn record_broadcast(
        &mut self,
        room: String,
        ty: String,
        payload: String,
        include_sender: bool,
        volatile: bool,
    ) -> Result<(), String> {
        self.grant_room(&room)?;
        self.record(Effect::Broadcast {
            room,
            ty,
            payload,
            include_sender,
            volatile,
        });
        Ok(())
    }

    fn check_handler(&self, handler: &str) -> Result<(), String> {
        if self.handlers.iter().any(|h| h == handler) {
            Ok(())
        } else {
            Err(format!(
                "plugin `{}` has no handler `{handler}` (it has: {})",
                self.env.id,
                self.handlers.join(", ")
            ))
        }
    }

    /// How many effects this call recorded that `pick` accepts.
    fn recorded(&self, pick: impl Fn(&Effect) -> bool) -> usize {
        self.effects.iter().filter(|e| pick(e)).count()
    }

    fn record_request(
        &mut self,
        to: RequestTo,
        ty: String,
        payload: String,
        timeout_ms: u64,
        handler: String,
    ) -> Result<u64, String> {
        use crate::requests::{MAX_REQUEST_TIMEOUT_MS, MAX_REQUESTS_PER_PLUGIN};
        self.check_handler(&handler)?;
        if timeout_ms == 0 || timeout_ms > MAX_REQUEST_TIMEOUT_MS {
            return Err(format!(
                "a request timeout must be between 1 and {MAX_REQUEST_TIMEOUT_MS} ms, not {timeout_ms}"
            ));
        }
        if ty.is_empty() || ty.starts_with("sys.") {
            return Err(format!("message type `{ty}` is not allowed"));
        }
        let mine = self.recorded(|e| matches!(e, Effect::Request { .. }));
        if self.env.requests.pending(&self.env.id) + mine >= MAX_REQUESTS_PER_PLUGIN {
            return Err(format!(
                "plugin `{}` has {MAX_REQUESTS_PER_PLUGIN} requests pending, the limit",
                self.env.id
            ));
        }
        let id = crate::protocol::next_message_id();
        self.record(Effect::Request {
            id,
            to,
            ty,
            payload,
            timeout_ms,
            handler,
        });
        Ok(id)
    }

    /// Checks that an effect on `room` is within the plugin's grant. One outside it is logged
    /// and refuses the whole call (none of its effects apply, whatever the handler does with
    /// the error), so that a plugin never reaches a room it was not granted.
    fn grant_room(&mut self, room: &str) -> Result<(), String> {
        self.check_room(room).inspect_err(|reason| {
            tracing::warn!(plugin = %self.env.id, %room, "effect outside the plugin's grant refused");
            self.refuse(reason.clone());
        })
    }

    fn check_room(&self, room: &str) -> Result<(), String> {
        if self.env.capabilities.allows_room(room) {
            Ok(())
        } else {
            Err(format!(
                "room `{room}` is not granted to plugin `{}`",
                self.env.id
            ))
        }
    }
}

impl types::Host for PluginState {}

impl messaging::Host for PluginState {
    fn reply(&mut self, ty: String, payload: String) {
        self.record(Effect::Reply { ty, payload });
    }

    fn send(&mut self, to: String, ty: String, payload: String) {
        self.record(Effect::Send { to, ty, payload });
    }

    fn broadcast(
        &mut self,
        room: String,
        ty: String,
        payload: String,
        include_sender: bool,
    ) -> Result<(), String> {
        self.record_broadcast(room, ty, payload, include_sender, false)
    }

    fn broadcast_volatile(
        &mut self,
        room: String,
        ty: String,
        payload: String,
        include_sender: bool,
    ) -> Result<(), String> {
        self.record_broadcast(room, ty, payload, include_sender, true)
    }

    fn request(
        &mut self,
        connection_id: String,
        ty: String,
        payload: String,
        timeout_ms: u64,
        handler: String,
    ) -> Result<u64, String> {
        self.record_request(
            RequestTo::Connection(connection_id),
            ty,
            payload,
            timeout_ms,
            handler,
        )
    }

    fn request_room(
        &mut self,
        room: String,
        ty: String,
        payload: String,
        timeout_ms: u64,
        handler: String,
    ) -> Result<u64, String> {
        self.grant_room(&room)?;
        self.record_request(RequestTo::Room(room), ty, payload, timeout_ms, handler)
    }
}

impl timers::Host for PluginState {
    fn schedule(&mut self, handler: String, delay_ms: u64, payload: String) -> Result<u64, String> {
        use crate::timers::{MAX_TIMER_DELAY_MS, MAX_TIMERS_PER_PLUGIN};
        self.check_handler(&handler)?;
        if delay_ms > MAX_TIMER_DELAY_MS {
            return Err(format!(
                "a timer delay of {delay_ms} ms is longer than the limit of {MAX_TIMER_DELAY_MS} ms"
            ));
        }
        let mine = self.recorded(|e| matches!(e, Effect::Schedule { .. }));
        if self.env.timers.pending(&self.env.id) + mine >= MAX_TIMERS_PER_PLUGIN {
            return Err(format!(
                "plugin `{}` has {MAX_TIMERS_PER_PLUGIN} timers pending, the limit",
                self.env.id
            ));
        }
        let id = self.env.timers.next_id();
        self.record(Effect::Schedule {
            id,
            handler,
            delay_ms,
            payload,
        });
        Ok(id)
    }

    fn cancel(&mut self, id: u64) -> bool {
        // Pending: in the host, or scheduled by this very call; and not cancelled by it yet.
        let here = |e: &Effect| matches!(e, Effect::Schedule { id: i, .. } if *i == id);
        let cancelled = |e: &Effect| matches!(e, Effect::CancelTimer { id: i } if *i == id);
        let pending = (self.recorded(here) > 0 || self.env.timers.is_pending(&self.env.id, id))
            && self.recorded(cancelled) == 0;
        if pending {
            self.record(Effect::CancelTimer { id });
        }
        pending
    }
}

impl rooms::Host for PluginState {
    fn join(&mut self, room: String) -> Result<(), String> {
        self.grant_room(&room)?;
        self.record(Effect::Join { room });
        Ok(())
    }

    fn leave(&mut self, room: String) -> Result<(), String> {
        self.grant_room(&room)?;
        self.record(Effect::Leave { room });
        Ok(())
    }

    fn members(&mut self, room: String) -> Result<Vec<types::Member>, String> {
        self.check_room(&room)?;
        Ok(self
            .env
            .rooms
            .members(&room)
            .into_iter()
            .map(|m| types::Member {
                connection_id: m.connection_id.to_string(),
                identity: m.identity.to_string(),
            })
            .collect())
    }
}

impl PluginState {
    /// The value under `key` as this call sees it: its own last write of the key, or else the
    /// store's value, whose version is recorded as read.
    fn kv_read(&mut self, key: &str) -> Option<String> {
        for effect in self.effects.iter().rev() {
            match effect {
                Effect::KvSet { key: k, value } if k == key => return Some(value.clone()),
                Effect::KvDelete { key: k } if k == key => return None,
                _ => {}
            }
        }
        let (value, version) = self.env.kv.read(key);
        if !self.reads.contains_key(key) {
            self.reads.insert(key.to_owned(), version);
        }
        value
    }

    /// Records a write, refusing the call's effects when the key or the value is too large.
    fn kv_write(&mut self, key: String, value: Option<String>) {
        if key.len() > MAX_KV_KEY_BYTES {
            self.refuse(format!(
                "a key-value key of {} bytes (the limit is {MAX_KV_KEY_BYTES})",
                key.len()
            ));
            return;
        }
        match value {
            Some(value) if value.len() > MAX_KV_VALUE_BYTES => self.refuse(format!(
                "a key-value value of {} bytes under key `{key}` (the limit is {MAX_KV_VALUE_BYTES})",
                value.len()
            )),
            Some(value) => self.record(Effect::KvSet { key, value }),
            None => self.record(Effect::KvDelete { key }),
        }
    }
}

impl kv::Host for PluginState {
    fn get(&mut self, key: String) -> Option<String> {
        self.kv_read(&key)
    }

    fn set(&mut self, key: String, value: String) {
        self.kv_write(key, Some(value));
    }

    fn delete(&mut self, key: String) {
        self.kv_write(key, None);
    }

    fn incr(&mut self, key: String, delta: i64) -> Result<i64, String> {
        let current = match self.kv_read(&key) {
            None => 0,
            Some(text) => text.parse::<i64>().map_err(|_| {
                format!("the value under key `{key}` is not a decimal 64-bit integer")
            })?,
        };
        let sum = current.checked_add(delta).ok_or_else(|| {
            format!("{current} + {delta} under key `{key}` overflows a 64-bit integer")
        })?;
        self.kv_write(key, Some(sum.to_string()));
        Ok(sum)
    }

    fn compare_and_set(
        &mut self,
        key: String,
        expected: Option<String>,
        value: Option<String>,
    ) -> bool {
        if self.kv_read(&key) != expected {
            return false;
        }
        self.kv_write(key, value);
        true
    }
}

impl logging::Host for PluginState {
    fn log(&mut self, level: types::LogLevel, message: String) {
        let level = match level {
            types::LogLevel::Trace => LogLevel::Trace,
            types::LogLevel::Debug => LogLevel::Debug,
            types::LogLevel::Info => LogLevel::Info,
            types::LogLevel::Warn => LogLevel::Warn,
            types::LogLevel::Error => LogLevel::Error,
        };
        if self.logs.len() < MAX_EFFECTS_PER_CALL {
            self.logs.push((level, message));
        }
    }
}

impl config::Host for PluginState {
    fn get(&mut self, key: String) -> Option<String> {
        self.env.config.get(&key).cloned()
    }
}

impl identity::Host for PluginState {
    fn claims(&mut self, connection_id: String) -> Option<String> {
        let claims = self.env.sessions.get(&connection_id)?.claims()?;
        // A map of JSON values always serializes.
        serde_json::to_string(&claims.all).ok()
    }
}

/// A ready instance with its store.
struct Warm {
    store: Store<PluginState>,
    bindings: bindings::Plugin,
}

/// One version of a WASM plugin: its pre-linked component and a pool of warm instances.
pub struct WasmPlugin {
    pre: bindings::PluginPre<PluginState>,
    env: Arc<PluginEnv>,
    /// The component's handler names (its `handlers` export); `handle` takes an index.
    handlers: Arc<[String]>,
    /// The `plexus:plugin` version the component was built against (its imports name it).
    interface: Option<String>,
    engine: Engine,
    ticker: Arc<EpochTicker>,
    pool: Mutex<Vec<Warm>>,
    /// Reuse instances (the default); when false every call gets a fresh store.
    reuse: bool,
}

impl WasmPlugin {
    /// Links `component` with the host interfaces its manifest grants and checks that it is a
    /// Plexus plugin. Instantiates once to prove it.
    pub fn new(
        runtime: &Runtime,
        component: &Component,
        env: Arc<PluginEnv>,
    ) -> Result<WasmPlugin, LoadError> {
        let engine = runtime.engine().clone();
        let mut interface: Option<(Semver, String)> = None;
        for (name, _) in component.component_type().imports(&engine) {
            if name.starts_with("wasi:") {
                continue;
            }
            if let Some(built) = interface_version(name) {
                match compat(built) {
                    Compat::Runs => {}
                    Compat::Newer => {
                        return Err(LoadError::Newer {
                            built: built.to_owned(),
                        });
                    }
                    Compat::Incompatible => {
                        return Err(LoadError::Incompatible {
                            built: built.to_owned(),
                        });
                    }
                }
                if let Some(v) = parse_semver(built)
                    && interface.as_ref().is_none_or(|(seen, _)| v > *seen)
                {
                    interface = Some((v, built.to_owned()));
                }
            }
            if name.starts_with("plexus:plugin/types") {
                continue;
            }
            match capability_of(name) {
                Some(cap) if env.capabilities.host.contains(&cap) => {}
                Some(cap) => {
                    return Err(LoadError::NotGranted {
                        import: name.to_owned(),
                        cap: cap.name(),
                    });
                }
                None => return Err(LoadError::UnknownImport(name.to_owned())),
            }
        }
        let mut linker: Linker<PluginState> = Linker::new(&engine);
        let not_a_plugin = |e: wasmtime::Error| LoadError::NotAPlugin(format!("{e:#}"));
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(not_a_plugin)?;
        stdio::link(&mut linker).map_err(not_a_plugin)?;
        types::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s).map_err(not_a_plugin)?;
        let caps = &env.capabilities.host;
        if caps.contains(&HostCap::Messaging) {
            messaging::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s).map_err(not_a_plugin)?;
        }
        if caps.contains(&HostCap::Rooms) {
            rooms::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s).map_err(not_a_plugin)?;
        }
        if caps.contains(&HostCap::Kv) {
            kv::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s).map_err(not_a_plugin)?;
        }
        if caps.contains(&HostCap::Logging) {
            logging::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s).map_err(not_a_plugin)?;
        }
        if caps.contains(&HostCap::Config) {
            config::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s).map_err(not_a_plugin)?;
        }
        if caps.contains(&HostCap::Timers) {
            timers::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s).map_err(not_a_plugin)?;
        }
        if caps.contains(&HostCap::Identity) {
            identity::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s).map_err(not_a_plugin)?;
        }
        let instance_pre: InstancePre<PluginState> =
            linker.instantiate_pre(component).map_err(not_a_plugin)?;
        let pre = bindings::PluginPre::new(instance_pre).map_err(not_a_plugin)?;
        let mut plugin = WasmPlugin {
            pre,
            env,
            handlers: Arc::from([]),
            interface: interface.map(|(_, v)| v),
            engine,
            ticker: runtime.ticker.clone(),
            pool: Mutex::new(Vec::new()),
            reuse: true,
        };
        plugin.ticker.cover(plugin.deadline_ticks());
        let mut warm = plugin
            .instantiate()
            .map_err(|e| LoadError::NotAPlugin(e.to_string()))?;
        plugin.handlers = warm
            .bindings
            .call_handlers(&mut warm.store)
            .map_err(|e| LoadError::NotAPlugin(format!("its `handlers` export trapped: {e:#}")))?
            .into();
        warm.store.data_mut().handlers = plugin.handlers.clone();
        plugin.release(warm);
        Ok(plugin)
    }

    /// The handler names the component exports.
    pub fn handlers(&self) -> &[String] {
        &self.handlers
    }

    /// The `plexus:plugin` version the component was built against.
    pub fn interface(&self) -> Option<&str> {
        self.interface.as_deref()
    }

    /// Makes every call use a fresh store (for measuring; slower).
    pub fn set_reuse_instances(&mut self, reuse: bool) {
        self.reuse = reuse;
    }

    fn instantiate(&self) -> Result<Warm, CallError> {
        let limits = MemoryLimiter {
            max: usize::try_from(self.env.limits.memory_mb << 20).unwrap_or(usize::MAX),
            used: 0,
        };
        let state = PluginState {
            wasi: WasiCtx::builder()
                .stdout(LogStdio::new(&self.env.id, Which::Stdout))
                .stderr(LogStdio::new(&self.env.id, Which::Stderr))
                .build(),
            table: ResourceTable::new(),
            limits,
            env: self.env.clone(),
            handlers: self.handlers.clone(),
            effects: Vec::new(),
            logs: Vec::new(),
            refused: None,
            effect_bytes: 0,
            reads: Default::default(),
            packed: String::new(),
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        store.epoch_deadline_trap();
        self.arm_deadline(&mut store);
        let bindings = self
            .pre
            .instantiate(&mut store)
            .map_err(|e| CallError::Instantiate {
                plugin: self.env.id.clone(),
                reason: format!("{e:#}"),
            })?;
        Ok(Warm { store, bindings })
    }

    /// Starts the plugin's deadline for what runs next in `store`, then tells the ticker, in
    /// that order: the ticker may sleep only once every call it was told of is past its deadline.
    fn arm_deadline(&self, store: &mut Store<PluginState>) {
        store.set_epoch_deadline(self.deadline_ticks());
        self.ticker.call_begins();
    }

    fn deadline_ticks(&self) -> u64 {
        self.env
            .limits
            .timeout_ms
            .div_ceil(EPOCH_TICK.as_millis() as u64)
            + 1
    }

    fn acquire(&self) -> Result<Warm, CallError> {
        if self.reuse
            && let Some(warm) = self.pool.lock().unwrap_or_else(|e| e.into_inner()).pop()
        {
            return Ok(warm);
        }
        self.instantiate()
    }

    fn release(&self, warm: Warm) {
        if !self.reuse {
            return;
        }
        let limit = (self.env.limits.memory_mb << 20) as f64;
        let grown = warm.store.data().limits.used as f64 > limit * RECYCLE_MEMORY_SHARE;
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        if !grown && pool.len() < POOL_MAX {
            pool.push(warm);
        }
    }

    /// Calls a handler, once. A trap drops the instance (a trapped component cannot be
    /// re-entered); so does a panic in a host function (a WASI call that would wait, such as a
    /// sleep, cannot on a runtime thread), which fails the call.
    pub fn call(&self, input: &CallInput<'_>) -> CallOutput {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.call_once(input)))
            .unwrap_or_else(|_| {
                CallOutput::failed(CallError::Trap {
                    plugin: self.env.id.clone(),
                    reason: "a host function panicked (a WASI call that waits, such as a sleep, cannot run in a plugin call)".into(),
                })
            })
    }

    fn call_once(&self, input: &CallInput<'_>) -> CallOutput {
        // Routes were checked against `handlers` at load; a few names, compared in place.
        let Some(handler) = self.handlers.iter().position(|h| h == input.handler) else {
            return CallOutput::failed(CallError::Refused {
                code: "unknown_handler".into(),
                message: format!(
                    "plugin `{}` has no handler `{}`",
                    self.env.id, input.handler
                ),
            });
        };
        let handler = u32::try_from(handler).unwrap_or(u32::MAX);
        let mut warm = match self.acquire() {
            Ok(warm) => warm,
            Err(e) => return CallOutput::failed(e),
        };
        let mut packed = {
            let state = warm.store.data_mut();
            state.effects = effects::list();
            state.logs.clear();
            state.refused = None;
            state.effect_bytes = 0;
            state.reads.clear();
            std::mem::take(&mut state.packed)
        };
        let msg = pack(input, &mut packed);
        self.arm_deadline(&mut warm.store);
        // `handle` says `true` for the common result, `Ok(None)`; anything else is fetched.
        let result = match warm.bindings.call_handle(&mut warm.store, handler, msg) {
            Ok(true) => Ok(Ok(None)),
            Ok(false) => warm.bindings.call_take_result(&mut warm.store),
            Err(trap) => Err(trap),
        };
        let state = warm.store.data_mut();
        // Kept for the next call unless a large message grew it.
        if packed.capacity() <= PACKED_KEEP {
            state.packed = packed;
        }
        let effects = std::mem::take(&mut state.effects);
        let logs = std::mem::take(&mut state.logs);
        let refused = state.refused.take();
        let reads = state.reads.drain().collect();
        let result = match result {
            Ok(Ok(ack)) => {
                self.release(warm);
                match refused {
                    Some(reason) => Err(CallError::BadEffect {
                        plugin: self.env.id.clone(),
                        reason,
                    }),
                    None => Ok(ack),
                }
            }
            Ok(Err(e)) => {
                self.release(warm);
                Err(CallError::Refused {
                    code: e.code,
                    message: e.message,
                })
            }
            Err(trap) => {
                let timed_out = matches!(
                    trap.downcast_ref::<wasmtime::Trap>(),
                    Some(wasmtime::Trap::Interrupt)
                );
                if timed_out {
                    Err(CallError::Timeout {
                        plugin: self.env.id.clone(),
                        timeout_ms: self.env.limits.timeout_ms,
                    })
                } else {
                    Err(CallError::Trap {
                        plugin: self.env.id.clone(),
                        reason: format!("{trap:#}"),
                    })
                }
            }
        };
        CallOutput {
            effects,
            logs,
            reads,
            result,
        }
    }
}

/// Packs a message as the WIT `message` record lays it out: the text fields concatenated into
/// `buf` (payload first), with the lengths that split them.
fn pack<'a>(input: &CallInput<'_>, buf: &'a mut String) -> types::Message<'a> {
    fn len(s: &str) -> u32 {
        // Frames are limited far below 4 GiB; saturating keeps a bad length detectable.
        u32::try_from(s.len()).unwrap_or(u32::MAX)
    }
    buf.clear();
    for field in [input.payload, input.ty, input.sender, input.connection_id]
        .into_iter()
        .chain(input.room)
        .chain(input.message_id)
        .chain(input.metadata)
    {
        buf.push_str(field);
    }
    types::Message {
        text: buf.as_str(),
        type_len: len(input.ty),
        sender_len: len(input.sender),
        connection_id_len: len(input.connection_id),
        room_len: input.room.map(len),
        message_id_len: input.message_id.map(len),
        metadata_len: input.metadata.map(len),
    }
}

/// Enforces a plugin's memory limit and remembers how large its memory grew.
struct MemoryLimiter {
    max: usize,
    used: usize,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max {
            return Ok(false);
        }
        self.used = self.used.max(desired);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

#[cfg(test)]
mod tests {
    use super::{CallInput, Compat, INTERFACE_VERSION, compat, interface_version, pack};

    #[test]
    fn the_interface_version_is_the_wit_package_version() {
        let wit = include_str!("../../../plugin-sdk/wit/plexus.wit");
        let package = format!("package plexus:plugin@{INTERFACE_VERSION};");
        assert!(wit.lines().any(|l| l == package), "{package}");
    }

    #[test]
    fn the_interface_version_of_an_import() {
        let ours = format!("plexus:plugin/messaging@{INTERFACE_VERSION}");
        assert_eq!(interface_version(&ours), Some(INTERFACE_VERSION));
        assert_eq!(
            interface_version("plexus:plugin/types@0.2.0"),
            Some("0.2.0")
        );
        assert_eq!(interface_version("wasi:io/streams@0.2.0"), None);
        assert_eq!(interface_version("plexus:plugin/types"), None);
    }

    #[test]
    fn earlier_versions_of_the_same_track_run() {
        assert_eq!(
            INTERFACE_VERSION, "0.3.4",
            "update these cases with the version"
        );
        assert_eq!(compat("0.3.0"), Compat::Runs);
        assert_eq!(compat("0.3.1"), Compat::Runs);
        assert_eq!(compat("0.3.2"), Compat::Runs);
        assert_eq!(compat("0.3.3"), Compat::Runs);
        assert_eq!(compat("0.3.4"), Compat::Runs);
        assert_eq!(compat("0.3.5"), Compat::Newer);
        assert_eq!(compat("0.2.9"), Compat::Incompatible);
        assert_eq!(compat("0.4.0"), Compat::Incompatible);
        assert_eq!(compat("1.3.0"), Compat::Incompatible);
        assert_eq!(compat("0.3.1-rc1"), Compat::Incompatible);
        assert_eq!(compat("banana"), Compat::Incompatible);
    }

    #[test]
    fn pack_concatenates_payload_first_then_the_fields_present() {
        let mut input = CallInput {
            handler: "send",
            ty: "chat.send",
            room: Some("lobby"),
            payload: r#"{"é":1}"#,
            sender: "guest-1",
            connection_id: "c-1",
            message_id: None,
            metadata: Some("{}"),
        };
        let mut buf = String::from("left over");
        let msg = pack(&input, &mut buf);
        assert_eq!(msg.text, r#"{"é":1}chat.sendguest-1c-1lobby{}"#);
        assert_eq!(
            (msg.type_len, msg.sender_len, msg.connection_id_len),
            (9, 7, 3)
        );
        assert_eq!(
            (msg.room_len, msg.message_id_len, msg.metadata_len),
            (Some(5), None, Some(2))
        );
        // An empty field is present, with length 0; an absent one is `None`.
        input.room = Some("");
        input.metadata = None;
        let msg = pack(&input, &mut buf);
        assert_eq!(msg.text, r#"{"é":1}chat.sendguest-1c-1"#);
        assert_eq!((msg.room_len, msg.metadata_len), (Some(0), None));
    }
}
