//! Watching for new plugin versions: manifests, component artifacts and (in `dev` mode) plugin
//! sources. A change, once writes settle, triggers a registry reload.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher as _};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::builder;
use crate::router::Hub;

/// What the host watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchMode {
    /// Nothing: plugins change only on an explicit reload.
    Off,
    /// Manifests and component artifacts (`plexus serve`).
    Artifacts,
    /// Also plugin sources, rebuilding a plugin when they change (`plexus dev`).
    Sources,
}

/// How long writes must pause before a reload starts.
const SETTLE: Duration = Duration::from_millis(150);

/// Starts watching; the task ends when `shutdown` turns true.
pub fn spawn(
    hub: Arc<Hub>,
    mode: WatchMode,
    mut shutdown: watch::Receiver<bool>,
) -> notify::Result<JoinHandle<()>> {
    let (tx, mut rx) = mpsc::unbounded_channel::<notify::Event>();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(event) = res {
            let _ = tx.send(event);
        }
    })?;
    let dir = absolute(hub.registry.dir());
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    let mut watched: HashSet<PathBuf> = HashSet::from([dir.clone()]);
    let mut targets = Targets::of(&hub, mode);
    targets.watch_new(&mut watcher, &mut watched);
    Ok(tokio::spawn(async move {
        loop {
            let event = tokio::select! {
                _ = crate::server::stopped(&mut shutdown) => return,
                event = rx.recv() => match event { Some(e) => e, None => return },
            };
            if !event.paths.iter().any(|p| targets.concerns(&dir, p)) {
                continue;
            }
            // Let the writes settle: wait until no relevant event came for SETTLE.
            while let Ok(Some(_)) = tokio::time::timeout(SETTLE, rx.recv()).await {}
            hub.registry.reload().await;
            targets = Targets::of(&hub, mode);
            targets.watch_new(&mut watcher, &mut watched);
        }
    }))
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

struct Targets {
    artifacts: Vec<PathBuf>,
    builds: Vec<crate::manifest::Build>,
}

impl Targets {
    fn of(hub: &Hub, mode: WatchMode) -> Targets {
        let mut artifacts = Vec::new();
        let mut builds = Vec::new();
        for (wasm, build) in hub.registry.watched() {
            artifacts.push(absolute(&wasm));
            if let (WatchMode::Sources, Some(mut build)) = (mode, build) {
                build.watch = build.watch.iter().map(|w| absolute(w)).collect();
                builds.push(build);
            }
        }
        Targets { artifacts, builds }
    }

    fn concerns(&self, manifests: &Path, path: &Path) -> bool {
        (path.parent() == Some(manifests) && path.extension().is_some_and(|e| e == "toml"))
            || self.artifacts.iter().any(|a| a == path)
            || self.builds.iter().any(|b| builder::watches(b, path))
    }

    fn watch_new(&self, watcher: &mut notify::RecommendedWatcher, watched: &mut HashSet<PathBuf>) {
        let dirs = self.artifacts.iter().filter_map(|a| {
            a.parent()
                .map(|p| (p.to_path_buf(), RecursiveMode::NonRecursive))
        });
        let sources = self.builds.iter().flat_map(|b| {
            b.watch
                .iter()
                .map(|w| (w.clone(), RecursiveMode::Recursive))
        });
        for (path, mode) in dirs.chain(sources) {
            if watched.contains(&path) || !path.exists() {
                continue;
            }
            match watcher.watch(&path, mode) {
                Ok(()) => {
                    watched.insert(path);
                }
                Err(e) => tracing::warn!(path = %path.display(), "cannot watch: {e}"),
            }
        }
    }
}
