//! The plugin registry: loads every manifest of a directory into plugin versions, builds the
//! route table, and swaps a new table in atomically on reload. A message in flight keeps the
//! table (and so the plugin version) it started with.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use dashmap::DashMap;
use tokio::sync::broadcast;

use crate::builder;
use crate::manifest::{self, HostEvent, Manifest, ManifestError, Source};
use crate::plugin::builtin::BuiltinPlugin;
use crate::plugin::wasm::{Runtime, WasmPlugin};
use crate::plugin::{Code, KvStore, PluginEnv};
use crate::rooms::Rooms;

/// One loaded version of a plugin.
#[derive(Debug)]
pub struct LoadedPlugin {
    pub manifest: Manifest,
    /// A label for this version: a hash of the manifest and the component bytes.
    pub version: String,
    pub code: Code,
    /// The plugin's key-value store, shared by all its versions.
    pub kv: KvStore,
    pub loaded_at: SystemTime,
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
    /// Plugins by manifest file.
    plugins: BTreeMap<PathBuf, Arc<LoadedPlugin>>,
}

impl RouteTable {
    fn new(plugins: BTreeMap<PathBuf, Arc<LoadedPlugin>>) -> RouteTable {
        let mut routes = foldhash::HashMap::default();
        let mut events: HashMap<HostEvent, Vec<RouteTarget>> = HashMap::new();
        for plugin in plugins.values() {
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
            plugins,
        }
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
}

/// What a reload did to one plugin. Subscribe with [`Registry::subscribe`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadEvent {
    /// A new version of the plugin now serves (or the plugin was added).
    Swapped { plugin: String, version: String },
    /// The plugin's manifest was removed; its routes are gone.
    Removed { plugin: String },
    /// A new version was refused; the previous version (if any) keeps serving.
    Rejected { file: PathBuf, reason: String },
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
    dir: PathBuf,
    options: LoadOptions,
    events: broadcast::Sender<ReloadEvent>,
    reload_lock: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn fingerprint(text: &str, bytes: &[u8]) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    bytes.hash(&mut h);
    format!("{:012x}", h.finish() & 0xffff_ffff_ffff)
}

/// The plugin a manifest file describes, loaded, or why not. Building and compiling run on
/// the blocking pool, off the connection tasks.
async fn load_one(
    runtime: &Runtime,
    rooms: &Arc<Rooms>,
    kv: KvStore,
    manifest: Manifest,
    text: &str,
    options: &LoadOptions,
    previous: Option<&Arc<LoadedPlugin>>,
) -> Result<Arc<LoadedPlugin>, ManifestError> {
    let fail = |message: String| ManifestError {
        file: manifest.file.clone(),
        line: None,
        message: format!("plugin `{}`: {message}", manifest.id),
    };
    let env = Arc::new(PluginEnv::new(&manifest, kv.clone(), rooms.clone()));
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
                    .map_err(&fail)?;
            }
            let bytes = std::fs::read(path)
                .map_err(|e| fail(format!("cannot read component {}: {e}", path.display())))?;
            let version = fingerprint(text, &bytes);
            if let Some(previous) = previous
                && previous.version == version
            {
                return Ok(previous.clone());
            }
            let compiler = runtime.clone();
            let component =
                blocking(move || compiler.compile(&bytes).map_err(|e| format!("{e:#}")))
                    .await
                    .map_err(|e| {
                        fail(format!("{} is not a valid component: {e}", path.display()))
                    })?;
            let plugin = WasmPlugin::new(runtime, &component, env)
                .map_err(|e| fail(format!("{} {e}", path.display())))?;
            (Code::Wasm(plugin), version)
        }
    };
    // Every route and event subscription must name a handler the code has.
    let handlers = code.handler_names();
    let subscriptions = manifest
        .events
        .iter()
        .map(|e| ("event", e.event.name(), &e.handler, None));
    let unknown = manifest
        .routes
        .iter()
        .map(|r| ("route", r.ty.as_str(), &r.handler, Some(r.line)))
        .chain(subscriptions)
        .find(|(.., handler, _)| !handlers.contains(&handler.as_str()));
    if let Some((what, name, handler, line)) = unknown {
        return Err(ManifestError {
            file: manifest.file.clone(),
            line,
            message: format!(
                "{what} `{name}`: plugin `{}` has no handler `{handler}` (it has: {})",
                manifest.id,
                handlers.join(", ")
            ),
        });
    }
    Ok(Arc::new(LoadedPlugin {
        manifest,
        version,
        code,
        kv,
        loaded_at: SystemTime::now(),
    }))
}

/// Runs blocking work (a build, a compilation) on the blocking pool.
async fn blocking<T: Send + 'static, E: From<String> + Send + 'static>(
    work: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, E> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|join| Err(E::from(format!("the work panicked: {join}"))))
}

impl Registry {
    /// Loads every manifest of `dir`. Fails with every problem found if any plugin cannot load.
    pub async fn load(
        dir: &Path,
        runtime: Runtime,
        rooms: Arc<Rooms>,
        options: LoadOptions,
    ) -> Result<Registry, Vec<ManifestError>> {
        let (events, _) = broadcast::channel(64);
        let registry = Registry {
            table: ArcSwap::from_pointee(RouteTable::default()),
            runtime,
            rooms,
            kv: DashMap::new(),
            dir: dir.to_path_buf(),
            options,
            events,
            reload_lock: tokio::sync::Mutex::new(()),
        };
        let (plugins, parsed, mut errors) = registry.load_all(&BTreeMap::new()).await;
        // Route conflicts are checked over every manifest that parses, loaded or not.
        errors.extend(manifest::check_set(&parsed));
        if !errors.is_empty() {
            errors.sort_by(|a, b| (&a.file, a.line).cmp(&(&b.file, b.line)));
            errors.dedup();
            return Err(errors);
        }
        registry.table.store(Arc::new(RouteTable::new(plugins)));
        Ok(registry)
    }

    /// Loads (or reuses) every manifest's plugin; blocking work runs off the async threads.
    /// Returns the loaded plugins, every manifest that parsed (loaded or not), and the errors.
    async fn load_all(
        &self,
        previous: &BTreeMap<PathBuf, Arc<LoadedPlugin>>,
    ) -> (
        BTreeMap<PathBuf, Arc<LoadedPlugin>>,
        Vec<Manifest>,
        Vec<ManifestError>,
    ) {
        let files = match manifest::manifest_files(&self.dir) {
            Ok(files) => files,
            Err(e) => return (BTreeMap::new(), Vec::new(), vec![e]),
        };
        let mut plugins = BTreeMap::new();
        let mut parsed = Vec::new();
        let mut errors = Vec::new();
        for file in files {
            let text = match std::fs::read_to_string(&file) {
                Ok(text) => text,
                Err(e) => {
                    errors.push(ManifestError {
                        file,
                        line: None,
                        message: format!("cannot read: {e}"),
                    });
                    continue;
                }
            };
            let manifest = match manifest::parse(&file, &text) {
                Ok(m) => m,
                Err(errs) => {
                    errors.extend(errs);
                    continue;
                }
            };
            parsed.push(manifest.clone());
            let kv = self.kv.entry(manifest.id.clone()).or_default().clone();
            let prev = previous.get(&file);
            match load_one(
                &self.runtime,
                &self.rooms,
                kv,
                manifest,
                &text,
                &self.options,
                prev,
            )
            .await
            {
                Ok(plugin) => {
                    plugins.insert(file, plugin);
                }
                Err(e) => errors.push(e),
            }
        }
        (plugins, parsed, errors)
    }

    /// Reloads the directory: changed plugins are rebuilt if stale, compiled, validated and
    /// swapped in; a plugin that fails keeps its previous version. Returns what happened.
    pub async fn reload(&self) -> Vec<ReloadEvent> {
        let _one_at_a_time = self.reload_lock.lock().await;
        let old = self.table.load_full();
        let (mut next, _, errors) = self.load_all(&old.plugins).await;
        let mut report = Vec::new();
        for e in errors {
            // Keep the previous version of a plugin whose new version failed.
            if let Some(prev) = old.plugins.get(&e.file) {
                next.insert(e.file.clone(), prev.clone());
            }
            report.push(ReloadEvent::Rejected {
                file: e.file.clone(),
                reason: e.to_string(),
            });
        }
        // A new version that claims a route another plugin has is refused.
        loop {
            let conflicts = manifest::check_set(next.values().map(|p| &p.manifest));
            let Some(conflict) = conflicts.into_iter().next() else {
                break;
            };
            let file = conflict.file.clone();
            match old.plugins.get(&file) {
                Some(prev) if !Arc::ptr_eq(prev, &next[&file]) => {
                    next.insert(file.clone(), prev.clone());
                }
                _ => {
                    next.remove(&file);
                }
            }
            report.push(ReloadEvent::Rejected {
                file,
                reason: conflict.to_string(),
            });
        }
        for (file, plugin) in &next {
            if old
                .plugins
                .get(file)
                .is_none_or(|p| !Arc::ptr_eq(p, plugin))
            {
                report.push(ReloadEvent::Swapped {
                    plugin: plugin.manifest.id.clone(),
                    version: plugin.version.clone(),
                });
            }
        }
        for (file, plugin) in &old.plugins {
            if !next.contains_key(file) {
                report.push(ReloadEvent::Removed {
                    plugin: plugin.manifest.id.clone(),
                });
            }
        }
        let changed = report
            .iter()
            .any(|e| !matches!(e, ReloadEvent::Rejected { .. }));
        if changed {
            self.table.store(Arc::new(RouteTable::new(next)));
        }
        for event in &report {
            match event {
                ReloadEvent::Swapped { plugin, version } => {
                    tracing::info!(%plugin, %version, "plugin version swapped in");
                }
                ReloadEvent::Removed { plugin } => tracing::info!(%plugin, "plugin removed"),
                ReloadEvent::Rejected { reason, .. } => {
                    tracing::error!(
                        "plugin version rejected, previous version keeps serving: {reason}"
                    );
                }
            }
            let _ = self.events.send(event.clone());
        }
        report
    }

    /// The current route table. Hold it for the whole of one message.
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
    let registry = Registry::load(dir, runtime, Arc::new(Rooms::default()), options).await?;
    Ok(registry.table().versions())
}
