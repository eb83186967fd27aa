//! The plugin registry: loads every manifest of a directory into plugin versions, builds the
//! route table, and swaps a new table in atomically on reload. A message in flight keeps the
//! table (and so the plugin version) it started with. It also keeps the book of every swap:
//! refused candidates, the previous version of each plugin (warm, for a rollback) and rollbacks.

pub mod health;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use arc_swap::ArcSwap;
use dashmap::DashMap;
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, broadcast, mpsc};

pub use health::{BreakerPolicy, Circuit, Health, HealthCounts, SwapPolicy, Verdict};

use crate::builder;
use crate::manifest::{self, HostEvent, Manifest, ManifestError, Source};
use crate::plugin::builtin::BuiltinPlugin;
use crate::plugin::wasm::{Runtime, WasmPlugin};
use crate::plugin::{Code, KvStore, PluginEnv};
use crate::requests::Requests;
use crate::rooms::Rooms;
use crate::session::Sessions;
use crate::timers::Timers;

/// One loaded version of a plugin.
#[derive(Debug)]
pub struct LoadedPlugin {
    pub manifest: Manifest,
    /// A label for this version: the start of the SHA-256 of the manifest text and the
    /// component bytes, the same on every host for the same files.
    pub version: String,
    pub code: Code,
    /// The plugin's key-value store, shared by all its versions.
    pub kv: KvStore,
    pub loaded_at: SystemTime,
    /// Calls, failures and calls in flight of this version, and its probation after a swap.
    pub health: Health,
}

/// Where a message type goes.
#[derive(Debug, Clone)]
pub struct RouteTarget {
    pub plugin: Arc<LoadedPlugin>,
    pub handler: Arc<str>,
    pub allow_outside_room: bool,
    /// Calls of this route wait for their turn per (plugin id, room): see [`crate::serial`].
    pub serialize: Option<manifest::SerializeBy>,
}

/// An immutable snapshot of every route; replaced whole on reload.
#[derive(Debug, Default)]
pub struct RouteTable {
    /// Looked up once per message with the client's `type`. Hashed with foldhash (seeded per
    /// table) instead of SipHash, which is slower and buys nothing here: the keys are the
    /// manifests', never the clients'.
    routes: foldhash::HashMap<String, RouteTarget>,
    events: HashMap<HostEvent, Vec<RouteTarget>>,
    /// The `room.join` hooks, by room pattern (no two patterns overlap: `manifest::check_set`).
    join_hooks: Vec<(manifest::RoomPattern, RouteTarget)>,
    /// Plugins by manifest file.
    plugins: BTreeMap<PathBuf, Arc<LoadedPlugin>>,
}

impl RouteTable {
    fn new(plugins: BTreeMap<PathBuf, Arc<LoadedPlugin>>) -> RouteTable {
        let mut routes = foldhash::HashMap::default();
        let mut events: HashMap<HostEvent, Vec<RouteTarget>> = HashMap::new();
        let mut join_hooks = Vec::new();
        for plugin in plugins.values() {
            for hook in &plugin.manifest.hooks {
                let manifest::HookPoint::RoomJoin = hook.on;
                let target = RouteTarget {
                    plugin: plugin.clone(),
                    handler: hook.handler.as_str().into(),
                    allow_outside_room: true,
                    serialize: None,
                };
                join_hooks.extend(hook.rooms.iter().map(|r| (r.clone(), target.clone())));
            }
            for r in &plugin.manifest.routes {
                routes.insert(
                    r.ty.clone(),
                    RouteTarget {
                        plugin: plugin.clone(),
                        handler: r.handler.as_str().into(),
                        allow_outside_room: r.allow_outside_room,
                        serialize: r.serialize,
                    },
                );
            }
            for e in &plugin.manifest.events {
                events.entry(e.event).or_default().push(RouteTarget {
                    plugin: plugin.clone(),
                    handler: e.handler.as_str().into(),
                    allow_outside_room: true,
                    serialize: None,
                });
            }
        }
        RouteTable {
            routes,
            events,
            join_hooks,
            plugins,
        }
    }

    /// The hook that decides who joins `room`, if a plugin hooks it.
    pub fn join_hook(&self, room: &str) -> Option<&RouteTarget> {
        self.join_hooks
            .iter()
            .find(|(pattern, _)| pattern.matches(room))
            .map(|(_, target)| target)
    }

    pub fn route(&self, ty: &str) -> Option<&RouteTarget> {
        self.routes.get(ty)
    }

    pub fn subscribers(&self, event: HostEvent) -> &[RouteTarget] {
        self.events.get(&event).map_or(&[], Vec::as_slice)
    }

    /// The loaded plugins, by id, with their versions.
    pub fn versions(&self) -> BTreeMap<String, String> {
        self.plugins
            .values()
            .map(|p| (p.manifest.id.clone(), p.version.clone()))
            .collect()
    }

    pub fn plugins(&self) -> impl Iterator<Item = &Arc<LoadedPlugin>> {
        self.plugins.values()
    }

    /// The serving version of plugin `id` (timers and request outcomes are calls of a plugin
    /// id, made on whichever version serves when they come due).
    pub fn plugin(&self, id: &str) -> Option<&Arc<LoadedPlugin>> {
        self.plugins.values().find(|p| p.manifest.id == id)
    }
}

/// What a reload did to one plugin. Subscribe with [`Registry::subscribe`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadEvent {
    /// A new version of the plugin now serves (or the plugin was added).
    Swapped { plugin: String, version: String },
    /// The plugin's manifest was removed; its routes are gone.
    Removed { plugin: String },
    /// A new version was refused; the previous version (if any) keeps serving. Reported once
    /// per candidate (the same files refused for the same reason are not reported again).
    Rejected { file: PathBuf, reason: String },
    /// The plugin's version `from` was rolled back to its previous version `to`.
    RolledBack {
        plugin: String,
        from: String,
        to: String,
        reason: String,
    },
}

/// A candidate version the registry refused, kept until its files change.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub error: ManifestError,
    /// The plugin id, when the manifest parsed.
    pub plugin: Option<String>,
    /// The version label of the refused candidate, when its files could be read.
    pub candidate: Option<String>,
    pub at: SystemTime,
}

/// A rollback that happened.
#[derive(Debug, Clone)]
pub struct Rollback {
    pub from: String,
    pub to: String,
    pub reason: String,
    pub automatic: bool,
    pub at: SystemTime,
}

/// A previous version kept warm after a swap.
#[derive(Debug, Clone)]
struct Kept {
    plugin: Arc<LoadedPlugin>,
    until: Instant,
}

/// What the registry remembers about swaps.
#[derive(Debug, Default)]
struct Book {
    refused: BTreeMap<PathBuf, Refusal>,
    previous: HashMap<String, Kept>,
    rollbacks: HashMap<String, Rollback>,
}

/// A plugin as `/healthz` reports it.
#[derive(Debug, Clone)]
pub struct PluginReport {
    pub id: String,
    pub version: String,
    /// The `plexus:plugin` interface version the component was built against.
    pub interface: Option<String>,
    pub loaded_at: SystemTime,
    pub counts: HealthCounts,
    pub on_probation: bool,
    /// The previous version, while it is kept warm, and until when.
    pub previous: Option<(String, SystemTime)>,
    pub last_rollback: Option<Rollback>,
    /// Timers the plugin has pending.
    pub timers: usize,
    /// Requests of the plugin awaiting client answers.
    pub requests: usize,
    /// The circuit of the serving version, and how many times it opened.
    pub circuit: (Circuit, u64),
    /// Whether the serving version's calls go through the slow lane.
    pub slow: bool,
}

/// Why a rollback was not done.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RollbackError {
    #[error("no plugin `{0}` is loaded")]
    UnknownPlugin(String),
    #[error(
        "no previous version of plugin `{plugin}` is kept (a previous version stays warm for {keep_secs} s after a swap)"
    )]
    NoPrevious { plugin: String, keep_secs: u64 },
    #[error("plugin `{plugin}` no longer runs version {version}")]
    Stale { plugin: String, version: String },
    #[error(
        "the previous version of plugin `{plugin}` conflicts with the current routes: {reason}"
    )]
    Conflict { plugin: String, reason: String },
}

/// A request to roll a failing version back, sent by the call path.
#[derive(Debug, Clone)]
pub struct RollbackRequest {
    pub plugin: String,
    pub version: String,
    pub reason: String,
}

/// Options for loading plugins.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Run manifests' build commands when artifacts are missing or stale.
    pub build: bool,
}

/// The plugin set of a host.
pub struct Registry {
    table: ArcSwap<RouteTable>,
    runtime: Runtime,
    rooms: Arc<Rooms>,
    kv: DashMap<String, KvStore>,
    /// The shared store every plugin's store replicates, in a cluster.
    kv_backend: std::sync::OnceLock<Arc<dyn crate::kv::KvBackend>>,
    /// Timers of every plugin, by plugin id (they outlive versions, like the store).
    timers: Arc<Timers>,
    /// Pending requests of every plugin.
    requests: Arc<Requests>,
    /// The host's sessions, which the hub shares: plugin calls read their verified claims.
    sessions: Arc<Sessions>,
    dir: PathBuf,
    options: LoadOptions,
    events: broadcast::Sender<ReloadEvent>,
    reload_lock: tokio::sync::Mutex<()>,
    policy: SwapPolicy,
    book: Mutex<Book>,
    /// Reloads run so far (explicit or by the watcher).
    reloads: AtomicU64,
    /// Rollbacks the call path asks for; taken by the host's supervisor task.
    rollback_tx: mpsc::UnboundedSender<RollbackRequest>,
    rollback_rx: Mutex<Option<mpsc::UnboundedReceiver<RollbackRequest>>>,
    /// Woken when a previous version is kept, so that the supervisor re-arms its expiry.
    kept_changed: Notify,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// The version label of a manifest text and its component bytes: the first 12 hex digits of
/// their SHA-256 (the text's length first, so that no two pairs share an input).
pub fn fingerprint(text: &str, bytes: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update((text.len() as u64).to_le_bytes());
    h.update(text.as_bytes());
    h.update(bytes);
    let digest = h.finalize();
    digest[..6].iter().map(|b| format!("{b:02x}")).collect()
}

/// The files a version is made of, for messages.
fn files_of(manifest: &Manifest) -> String {
    match &manifest.source {
        Source::Wasm { path, .. } => format!("{} and {}", manifest.file.display(), path.display()),
        Source::Builtin(_) => manifest.file.display().to_string(),
    }
}

/// Why loading one manifest failed, with the candidate's version label when it was computed.
type LoadFailure = (ManifestError, Option<String>);

/// The plugin a manifest file describes, loaded, or why not. Reading, building and compiling
/// run on the blocking pool, off the connection tasks. A candidate already refused (the same
/// files) is refused again without compiling it.
async fn load_one(
    registry: &Registry,
    manifest: Manifest,
    text: &str,
    previous: Option<&Arc<LoadedPlugin>>,
    refused: Option<&Refusal>,
) -> Result<Arc<LoadedPlugin>, LoadFailure> {
    let fail = |message: String| ManifestError {
        file: manifest.file.clone(),
        line: None,
        message: format!("plugin `{}`: {message}", manifest.id),
    };
    let (runtime, options) = (&registry.runtime, &registry.options);
    let kv = registry.kv_store(&manifest.id);
    let env = Arc::new(
        PluginEnv::new(&manifest, kv.clone(), registry.rooms.clone()).with_host(
            registry.timers.clone(),
            registry.requests.clone(),
            registry.sessions.clone(),
        ),
    );
    let (code, version) = match &manifest.source {
        Source::Builtin(kind) => (
            Code::Builtin(BuiltinPlugin::new(*kind, env)),
            fingerprint(text, b"builtin"),
        ),
        Source::Wasm { path, build } => {
            if let Some(build) = build
                && options.build
                && builder::is_stale(path, build)
            {
                let build = build.clone();
                blocking(move || builder::run(&build))
                    .await
                    .map_err(|e| (fail(e), None))?;
            }
            let read = path.clone();
            let bytes = blocking(move || {
                std::fs::read(&read)
                    .map_err(|e| format!("cannot read component {}: {e}", read.display()))
            })
            .await
            .map_err(|e| (fail(e), None))?;
            let version = fingerprint(text, &bytes);
            if let Some(previous) = previous
                && previous.version == version
            {
                return Ok(previous.clone());
            }
            if let Some(refused) = refused
                && refused.candidate.as_deref() == Some(version.as_str())
            {
                return Err((refused.error.clone(), Some(version)));
            }
            let compiler = runtime.clone();
            let component =
                blocking(move || compiler.compile(&bytes).map_err(|e| format!("{e:#}")))
                    .await
                    .map_err(|e| {
                        let e = fail(format!("{} is not a valid component: {e}", path.display()));
                        (e, Some(version.clone()))
                    })?;
            let plugin = WasmPlugin::new(runtime, &component, env).map_err(|e| {
                (
                    fail(format!("{} {e}", path.display())),
                    Some(version.clone()),
                )
            })?;
            (Code::Wasm(plugin), version)
        }
    };
    // Every route, event subscription and hook must name a handler the code has.
    let handlers = code.handler_names();
    let subscriptions = manifest
        .events
        .iter()
        .map(|e| ("event", e.event.name(), &e.handler, None));
    let hooks = manifest
        .hooks
        .iter()
        .map(|h| ("hook", h.on.name(), &h.handler, Some(h.line)));
    let unknown = manifest
        .routes
        .iter()
        .map(|r| ("route", r.ty.as_str(), &r.handler, Some(r.line)))
        .chain(subscriptions)
        .chain(hooks)
        .find(|(.., handler, _)| !handlers.contains(&handler.as_str()));
    if let Some((what, name, handler, line)) = unknown {
        let error = ManifestError {
            file: manifest.file.clone(),
            line,
            message: format!(
                "{what} `{name}`: plugin `{}` has no handler `{handler}` (it has: {}){}",
                manifest.id,
                handlers.join(", "),
                match &manifest.source {
                    Source::Wasm { path, .. } => format!(" in component {}", path.display()),
                    Source::Builtin(_) => String::new(),
                }
            ),
        };
        return Err((error, Some(version)));
    }
    Ok(Arc::new(LoadedPlugin {
        manifest,
        version,
        code,
        kv,
        loaded_at: SystemTime::now(),
        health: Health::default(),
    }))
}

/// Runs blocking work (a build, a compilation, a file read) on the blocking pool.
async fn blocking<T: Send + 'static, E: From<String> + Send + 'static>(
    work: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, E> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|join| Err(E::from(format!("the work panicked: {join}"))))
}

/// What loading a manifests directory gave.
#[derive(Debug, Default)]
struct Loaded {
    plugins: BTreeMap<PathBuf, Arc<LoadedPlugin>>,
    /// Every manifest that parsed, loaded or not.
    parsed: Vec<Manifest>,
    failures: Vec<LoadFailure>,
    /// Every manifest file found.
    files: HashSet<PathBuf>,
}

impl Registry {
    /// Loads every manifest of `dir`. Fails with every problem found if any plugin cannot load.
    pub async fn load(
        dir: &Path,
        runtime: Runtime,
        rooms: Arc<Rooms>,
        options: LoadOptions,
        policy: SwapPolicy,
    ) -> Result<Registry, Vec<ManifestError>> {
        let (events, _) = broadcast::channel(64);
        let (rollback_tx, rollback_rx) = mpsc::unbounded_channel();
        let registry = Registry {
            table: ArcSwap::from_pointee(RouteTable::default()),
            runtime,
            rooms,
            kv: DashMap::new(),
            kv_backend: std::sync::OnceLock::new(),
            timers: Default::default(),
            requests: Default::default(),
            sessions: Default::default(),
            dir: dir.to_path_buf(),
            options,
            events,
            reload_lock: tokio::sync::Mutex::new(()),
            policy,
            book: Mutex::new(Book::default()),
            reloads: AtomicU64::new(0),
            rollback_tx,
            rollback_rx: Mutex::new(Some(rollback_rx)),
            kept_changed: Notify::new(),
        };
        let loaded = registry.load_all(&BTreeMap::new()).await;
        let mut errors: Vec<ManifestError> = loaded.failures.into_iter().map(|(e, _)| e).collect();
        // Route conflicts are checked over every manifest that parses, loaded or not.
        errors.extend(manifest::check_set(&loaded.parsed));
        if !errors.is_empty() {
            errors.sort_by(|a, b| (&a.file, a.line).cmp(&(&b.file, b.line)));
            errors.dedup();
            return Err(errors);
        }
        registry
            .table
            .store(Arc::new(RouteTable::new(loaded.plugins)));
        Ok(registry)
    }

    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Loads (or reuses) every manifest's plugin; blocking work runs off the async threads.
    async fn load_all(&self, previous: &BTreeMap<PathBuf, Arc<LoadedPlugin>>) -> Loaded {
        let dir = self.dir.clone();
        let files =
            match blocking(move || manifest::manifest_files(&dir).map_err(|e| e.to_string())).await
            {
                Ok(files) => files,
                Err(e) => {
                    let error = ManifestError {
                        file: self.dir.clone(),
                        line: None,
                        message: e,
                    };
                    return Loaded {
                        failures: vec![(error, None)],
                        ..Loaded::default()
                    };
                }
            };
        let mut loaded = Loaded::default();
        for file in files {
            loaded.files.insert(file.clone());
            let read = file.clone();
            let text = match blocking(move || {
                std::fs::read_to_string(&read).map_err(|e| format!("cannot read: {e}"))
            })
            .await
            {
                Ok(text) => text,
                Err(message) => {
                    let error = ManifestError {
                        file,
                        line: None,
                        message,
                    };
                    loaded.failures.push((error, None));
                    continue;
                }
            };
            let manifest = match manifest::parse(&file, &text) {
                Ok(m) => m,
                Err(errs) => {
                    let candidate = fingerprint(&text, b"");
                    loaded
                        .failures
                        .extend(errs.into_iter().map(|e| (e, Some(candidate.clone()))));
                    continue;
                }
            };
            loaded.parsed.push(manifest.clone());
            let refused = self.book().refused.get(&file).cloned();
            match load_one(self, manifest, &text, previous.get(&file), refused.as_ref()).await {
                Ok(plugin) => {
                    loaded.plugins.insert(file, plugin);
                }
                Err(failure) => loaded.failures.push(failure),
            }
        }
        loaded
    }

    /// Reloads the directory: changed plugins are rebuilt if stale, compiled, validated and
    /// swapped in; a plugin that fails keeps its previous version. Returns what happened.
    pub async fn reload(&self) -> Vec<ReloadEvent> {
        let _one_at_a_time = self.reload_lock.lock().await;
        self.reloads.fetch_add(1, Ordering::Relaxed);
        let old = self.table.load_full();
        let loaded = self.load_all(&old.plugins).await;
        let mut next = loaded.plugins;
        let mut failures = loaded.failures;
        for (e, _) in &failures {
            // Keep the previous version of a plugin whose new version failed.
            if let Some(prev) = old.plugins.get(&e.file) {
                next.insert(e.file.clone(), prev.clone());
            }
        }
        // A new version that claims a route another plugin has is refused. The serving
        // (unchanged) plugins are checked first, so that a conflict is laid on the newcomer.
        loop {
            let unchanged = |file: &PathBuf, p: &Arc<LoadedPlugin>| {
                old.plugins.get(file).is_some_and(|o| Arc::ptr_eq(o, p))
            };
            let mut ordered: Vec<(&PathBuf, &Arc<LoadedPlugin>)> = next.iter().collect();
            ordered.sort_by_key(|(file, p)| !unchanged(file, p));
            let conflicts = manifest::check_set(ordered.into_iter().map(|(_, p)| &p.manifest));
            let Some(conflict) = conflicts.into_iter().next() else {
                break;
            };
            let file = conflict.file.clone();
            let candidate = next.get(&file).map(|p| p.version.clone());
            match old.plugins.get(&file) {
                Some(prev) if !Arc::ptr_eq(prev, &next[&file]) => {
                    next.insert(file.clone(), prev.clone());
                }
                _ => {
                    next.remove(&file);
                }
            }
            failures.push((conflict, candidate));
        }
        let mut report = Vec::new();
        let now = Instant::now();
        let mut book = self.book();
        // Refusals: each reported once per candidate and reason; forgotten once the file loads
        // or is gone.
        let failed: HashSet<&PathBuf> = failures.iter().map(|(e, _)| &e.file).collect();
        book.refused.retain(|file, _| failed.contains(file));
        for (error, candidate) in failures {
            let file = error.file.clone();
            let again = book
                .refused
                .get(&file)
                .is_some_and(|r| r.error == error && r.candidate == candidate);
            if again {
                continue;
            }
            let plugin = next
                .get(&file)
                .or_else(|| old.plugins.get(&file))
                .map(|p| p.manifest.id.clone());
            report.push(ReloadEvent::Rejected {
                file: file.clone(),
                reason: error.to_string(),
            });
            book.refused.insert(
                file,
                Refusal {
                    error,
                    plugin,
                    candidate,
                    at: SystemTime::now(),
                },
            );
        }
        for (file, plugin) in &next {
            let prev = old.plugins.get(file);
            if prev.is_some_and(|p| Arc::ptr_eq(p, plugin)) {
                continue;
            }
            report.push(ReloadEvent::Swapped {
                plugin: plugin.manifest.id.clone(),
                version: plugin.version.clone(),
            });
            let Some(prev) = prev else {
                continue;
            };
            // The version it replaces stays warm for a rollback, and the new one is on probation.
            let id = plugin.manifest.id.clone();
            book.rollbacks.remove(&id);
            if prev.manifest.id == id && !self.policy.keep_previous.is_zero() {
                plugin.health.start_probation(&self.policy);
                book.previous.insert(
                    id,
                    Kept {
                        plugin: prev.clone(),
                        until: now + crate::timers::capped(self.policy.keep_previous),
                    },
                );
                self.kept_changed.notify_one();
            }
        }
        for (file, plugin) in &old.plugins {
            if !next.contains_key(file) {
                book.previous.remove(&plugin.manifest.id);
                report.push(ReloadEvent::Removed {
                    plugin: plugin.manifest.id.clone(),
                });
            }
        }
        drop(book);
        let changed = report
            .iter()
            .any(|e| !matches!(e, ReloadEvent::Rejected { .. }));
        if changed {
            self.table.store(Arc::new(RouteTable::new(next)));
        }
        for event in &report {
            self.announce(event);
        }
        report
    }

    /// Logs a reload outcome and tells the subscribers.
    fn announce(&self, event: &ReloadEvent) {
        match event {
            ReloadEvent::Swapped { plugin, version } => {
                tracing::info!(%plugin, %version, "plugin version swapped in");
            }
            ReloadEvent::Removed { plugin } => tracing::info!(%plugin, "plugin removed"),
            ReloadEvent::Rejected { reason, .. } => {
                tracing::error!(
                    "plugin version refused, the serving version keeps serving: {reason}"
                );
            }
            ReloadEvent::RolledBack {
                plugin,
                from,
                to,
                reason,
            } => {
                tracing::warn!(%plugin, %from, %to, "plugin version rolled back: {reason}");
            }
        }
        let _ = self.events.send(event.clone());
    }

    /// Rolls plugin `id` back to the version it replaced, while that version is kept warm. With
    /// `expected`, only if `expected` is the version serving. The version rolled back from is
    /// refused until its files change.
    pub async fn rollback(
        &self,
        id: &str,
        expected: Option<&str>,
        reason: &str,
        automatic: bool,
    ) -> Result<ReloadEvent, RollbackError> {
        let _one_at_a_time = self.reload_lock.lock().await;
        let old = self.table.load_full();
        let Some((file, current)) = old.plugins.iter().find(|(_, p)| p.manifest.id == id) else {
            return Err(RollbackError::UnknownPlugin(id.to_owned()));
        };
        if let Some(expected) = expected
            && current.version != expected
        {
            return Err(RollbackError::Stale {
                plugin: id.to_owned(),
                version: expected.to_owned(),
            });
        }
        let now = Instant::now();
        let kept = self
            .book()
            .previous
            .get(id)
            .filter(|k| k.until > now)
            .cloned();
        let Some(kept) = kept else {
            return Err(RollbackError::NoPrevious {
                plugin: id.to_owned(),
                keep_secs: self.policy.keep_previous.as_secs(),
            });
        };
        let mut next = old.plugins.clone();
        next.insert(file.clone(), kept.plugin.clone());
        if let Some(conflict) = manifest::check_set(next.values().map(|p| &p.manifest))
            .into_iter()
            .next()
        {
            return Err(RollbackError::Conflict {
                plugin: id.to_owned(),
                reason: conflict.to_string(),
            });
        }
        self.table.store(Arc::new(RouteTable::new(next)));
        let event = ReloadEvent::RolledBack {
            plugin: id.to_owned(),
            from: current.version.clone(),
            to: kept.plugin.version.clone(),
            reason: reason.to_owned(),
        };
        {
            let mut book = self.book();
            book.previous.remove(id);
            book.refused.insert(
                file.clone(),
                Refusal {
                    error: ManifestError {
                        file: file.clone(),
                        line: None,
                        message: format!(
                            "plugin `{id}`: version {} ({}) was rolled back ({reason}); it stays refused until its files change",
                            current.version,
                            files_of(&current.manifest),
                        ),
                    },
                    plugin: Some(id.to_owned()),
                    candidate: Some(current.version.clone()),
                    at: SystemTime::now(),
                },
            );
            book.rollbacks.insert(
                id.to_owned(),
                Rollback {
                    from: current.version.clone(),
                    to: kept.plugin.version.clone(),
                    reason: reason.to_owned(),
                    automatic,
                    at: SystemTime::now(),
                },
            );
        }
        self.announce(&event);
        Ok(event)
    }

    /// Runs until `stop` resolves: carries out the rollbacks the call path asks for, and lets
    /// the previous versions go when their time is up.
    pub async fn supervise(&self, stop: impl std::future::Future<Output = ()>) {
        // The first caller takes the requests.
        let taken = self
            .rollback_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let Some(mut requests) = taken else {
            return;
        };
        let mut stop = std::pin::pin!(stop);
        loop {
            let next_expiry = self.expire_previous();
            let expiry = async {
                match next_expiry {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = &mut stop => return,
                request = requests.recv() => {
                    let Some(r) = request else { return };
                    if let Err(e) = self.rollback(&r.plugin, Some(&r.version), &r.reason, true).await {
                        tracing::warn!(plugin = %r.plugin, version = %r.version, "automatic rollback not done: {e}");
                    }
                }
                () = self.kept_changed.notified() => {}
                () = expiry => {}
            }
        }
    }

    /// Asks for version `version` of plugin `plugin` to be rolled back (from the call path,
    /// which cannot wait for the reload lock). The host's supervisor does it.
    pub fn request_rollback(&self, plugin: &str, version: &str, reason: String) {
        let _ = self.rollback_tx.send(RollbackRequest {
            plugin: plugin.to_owned(),
            version: version.to_owned(),
            reason,
        });
    }

    /// Drops the previous versions whose time is up; returns when the next one expires.
    fn expire_previous(&self) -> Option<Instant> {
        let now = Instant::now();
        let mut book = self.book();
        book.previous.retain(|_, k| k.until > now);
        book.previous.values().map(|k| k.until).min()
    }

    /// The key-value store of plugin `id` (shared by all its versions), for inspection and
    /// administration by the embedding program.
    pub fn kv_store(&self, id: &str) -> KvStore {
        if let Some(store) = self.kv.get(id) {
            return store.clone();
        }
        let store = self
            .kv
            .entry(id.to_owned())
            .or_insert_with(|| Arc::new(crate::kv::KvStore::new(id)))
            .clone();
        if let Some(backend) = self.kv_backend.get()
            && store.set_backend(backend.clone())
        {
            backend.track(&store);
        }
        store
    }

    /// Makes every plugin's store, now and later, a replica of `backend`'s (a cluster's).
    pub fn set_kv_backend(&self, backend: Arc<dyn crate::kv::KvBackend>) {
        if self.kv_backend.set(backend.clone()).is_err() {
            return;
        }
        let stores: Vec<KvStore> = self.kv.iter().map(|s| s.value().clone()).collect();
        for store in stores {
            if store.set_backend(backend.clone()) {
                backend.track(&store);
            }
        }
    }

    /// The swap policy.
    pub fn policy(&self) -> &SwapPolicy {
        &self.policy
    }

    /// How many reloads ran so far.
    pub fn reloads(&self) -> u64 {
        self.reloads.load(Ordering::Relaxed)
    }

    /// Every plugin serving, for `/healthz`.
    pub fn report(&self) -> Vec<PluginReport> {
        let table = self.table.load();
        let book = self.book();
        let now = Instant::now();
        let wall = SystemTime::now();
        table
            .plugins()
            .map(|p| {
                let id = &p.manifest.id;
                let previous = book.previous.get(id).filter(|k| k.until > now).map(|k| {
                    (
                        k.plugin.version.clone(),
                        wall + k.until.saturating_duration_since(now),
                    )
                });
                PluginReport {
                    id: id.clone(),
                    version: p.version.clone(),
                    interface: p.code.interface().map(str::to_owned),
                    loaded_at: p.loaded_at,
                    counts: p.health.counts(),
                    on_probation: p.health.on_probation(),
                    previous,
                    last_rollback: book.rollbacks.get(id).cloned(),
                    timers: self.timers.pending(id),
                    requests: self.requests.pending(id),
                    circuit: p.health.circuit(),
                    slow: p.health.is_slow(),
                }
            })
            .collect()
    }

    /// The candidates currently refused, by file.
    pub fn refused(&self) -> Vec<Refusal> {
        self.book().refused.values().cloned().collect()
    }

    /// The current route table. Hold it for the whole of one message.
    /// The timers of every plugin.
    pub fn timers(&self) -> &Arc<Timers> {
        &self.timers
    }

    /// The pending requests of every plugin.
    pub fn requests(&self) -> &Arc<Requests> {
        &self.requests
    }

    /// The host's sessions (the hub's `sessions`).
    pub fn sessions(&self) -> &Arc<Sessions> {
        &self.sessions
    }

    pub fn table(&self) -> arc_swap::Guard<Arc<RouteTable>> {
        self.table.load()
    }

    /// The current route table, as an owned pointer to hold across awaits.
    pub fn table_full(&self) -> Arc<RouteTable> {
        self.table.load_full()
    }

    /// Reload outcomes as they happen.
    pub fn subscribe(&self) -> broadcast::Receiver<ReloadEvent> {
        self.events.subscribe()
    }

    /// The directory the manifests are read from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The build steps and artifacts of the loaded plugins (for the watcher).
    pub fn watched(&self) -> Vec<(PathBuf, Option<manifest::Build>)> {
        self.table
            .load()
            .plugins()
            .filter_map(|p| match &p.manifest.source {
                Source::Wasm { path, build } => Some((path.clone(), build.clone())),
                Source::Builtin(_) => None,
            })
            .collect()
    }
}

/// Everything `plexus check` reports for a directory: manifest errors, route conflicts, build,
/// compile and validation failures. Empty when all is well.
pub async fn check(
    dir: &Path,
    options: LoadOptions,
) -> Result<BTreeMap<String, String>, Vec<ManifestError>> {
    let runtime = Runtime::new().map_err(|e| {
        vec![ManifestError {
            file: dir.to_path_buf(),
            line: None,
            message: format!("{e:#}"),
        }]
    })?;
    let registry = Registry::load(
        dir,
        runtime,
        Arc::new(Rooms::default()),
        options,
        SwapPolicy::default(),
    )
    .await?;
    Ok(registry.table().versions())
}
