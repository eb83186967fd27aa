//! Watching for new plugin versions: manifests, component artifacts and (in `dev` mode) plugin
//! sources. A change of content (not a read: the host's own reads never trigger a reload), once
//! the changes settle and every file written in place is closed, triggers a registry reload.

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

/// How long changes must pause before a reload starts.
const SETTLE: Duration = Duration::from_millis(150);
/// How long a file written in place may stay open for writing before it is loaded anyway (for
/// platforms that report no close; inotify does).
const WRITE_WAIT_MAX: Duration = Duration::from_secs(10);

/// What a filesystem event means for the watcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    /// Not a change of content: a file opened or read (the host's own reads among them), or
    /// its metadata changed.
    None,
    /// Content is being written in place: the file may be incomplete until it is closed.
    Writing,
    /// A complete change: a file closed after writing, a rename into place, a removal.
    Done,
}

fn classify(kind: &notify::EventKind) -> Change {
    use notify::EventKind;
    use notify::event::{AccessKind, AccessMode, ModifyKind};
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => Change::Done,
        EventKind::Access(_) | EventKind::Modify(ModifyKind::Metadata(_)) => Change::None,
        EventKind::Create(_) | EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Any) => {
            Change::Writing
        }
        _ => Change::Done,
    }
}

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
            // Files written in place and not closed yet.
            let mut writing = HashSet::new();
            if !targets.note(&dir, &event, &mut writing) {
                continue;
            }
            // Let the changes settle: wait until no change came for SETTLE and every file
            // written in place was closed (so that a half-written component is never loaded).
            // Events that change nothing (reads) do not restart the wait.
            let first = tokio::time::Instant::now();
            let mut quiet_at = first + SETTLE;
            loop {
                let until = if writing.is_empty() {
                    quiet_at
                } else {
                    first + WRITE_WAIT_MAX
                };
                match tokio::time::timeout_at(until, rx.recv()).await {
                    Ok(Some(event)) => {
                        if targets.note(&dir, &event, &mut writing) {
                            quiet_at = tokio::time::Instant::now() + SETTLE;
                        }
                    }
                    Ok(None) => return,
                    Err(_) if writing.is_empty() => break,
                    Err(_) => {
                        tracing::warn!(files = ?writing, "files still open for writing after {WRITE_WAIT_MAX:?}; loading them as they are");
                        break;
                    }
                }
            }
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

    /// Takes note of an event: updates the files open for writing, and says whether it changes
    /// something the host loads.
    fn note(
        &self,
        manifests: &Path,
        event: &notify::Event,
        writing: &mut HashSet<PathBuf>,
    ) -> bool {
        let change = classify(&event.kind);
        let mut relevant = false;
        for path in event.paths.iter().filter(|p| self.concerns(manifests, p)) {
            match change {
                Change::None => continue,
                Change::Writing => {
                    writing.insert(path.clone());
                }
                Change::Done => {
                    writing.remove(path);
                }
            }
            relevant = true;
        }
        relevant
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
