//! Rolling plugin files out through Redis, for nodes that share no directory. `plexus rollout
//! --cluster URL FILE...` stores each file under its content hash (`plexus:artifact:SHA256`),
//! records it as the cluster's version of that file name (`plexus:rollout`: name → SHA-256) and
//! tells every node (channel `plexus:rollout`). Each node writes the files whose content differs
//! into its own manifests directory (beside their place, then renamed into it, so that no
//! watcher reads half a file), where its watcher swaps them in as it would any change: with the
//! guarantees of a local swap. A node that starts, or reconnects, later catches up from
//! `plexus:rollout`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redis::AsyncCommands;
use sha2::{Digest, Sha256};

use super::Shared;

/// The channel nodes hear rollouts on, and the hash of the rolled-out files.
pub const CHANNEL: &str = "plexus:rollout";

fn artifact_key(sha: &str) -> String {
    format!("plexus:artifact:{sha}")
}

/// The SHA-256 of `bytes`, in hex.
pub fn content_hash(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Why a rollout could not be published.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}: only a plain file name can be rolled out (no directory, no leading dot)")]
    Name(PathBuf),
    #[error("Redis at {url}: {source}")]
    Redis {
        url: String,
        source: redis::RedisError,
    },
}

/// Whether `name` may be written into a manifests directory: a plain file name.
fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && Path::new(name).file_name().and_then(|n| n.to_str()) == Some(name)
}

/// Publishes `files` to every node of the cluster at `url`. Returns each file's name and
/// content hash.
pub async fn publish(url: &str, files: &[PathBuf]) -> Result<Vec<(String, String)>, RolloutError> {
    let mut read = Vec::new();
    for path in files {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| plain_name(n))
            .ok_or_else(|| RolloutError::Name(path.clone()))?
            .to_owned();
        let bytes = std::fs::read(path).map_err(|source| RolloutError::Read {
            path: path.clone(),
            source,
        })?;
        read.push((name, bytes));
    }
    let redis = |source| RolloutError::Redis {
        url: url.to_owned(),
        source,
    };
    let client = redis::Client::open(url).map_err(redis)?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(redis)?;
    let mut published = Vec::new();
    for (name, bytes) in read {
        let sha = content_hash(&bytes);
        let _: () = conn.set(artifact_key(&sha), bytes).await.map_err(redis)?;
        let previous: Option<String> = conn.hget(CHANNEL, &name).await.map_err(redis)?;
        let _: () = conn.hset(CHANNEL, &name, &sha).await.map_err(redis)?;
        // An artifact no file name refers to any more goes.
        if let Some(previous) = previous.filter(|p| *p != sha) {
            let all: Vec<String> = conn.hvals(CHANNEL).await.map_err(redis)?;
            if !all.contains(&previous) {
                let _: () = conn.del(artifact_key(&previous)).await.map_err(redis)?;
            }
        }
        published.push((name, sha));
    }
    let _: () = conn.publish(CHANNEL, "changed").await.map_err(redis)?;
    Ok(published)
}

/// Brings this node's manifests directory to the cluster's rolled-out files: writes each one
/// whose content differs (one run at a time), then reloads the directory, so that the swap does
/// not depend on the watcher having seen the write (it may not watch yet, at start-up).
pub(super) async fn follow(shared: Arc<Shared>, hub: Arc<crate::router::Hub>) {
    let Some(dir) = shared.manifests.clone() else {
        return;
    };
    let _turn = shared.rollout_turn.lock().await;
    let result = fetch(&shared, &dir).await;
    shared.link.outcome(&result).await;
    match result {
        Ok(0) => {}
        Ok(_) => {
            hub.registry.reload().await;
        }
        Err(e) => tracing::warn!("cluster: following the rollout failed: {e}"),
    }
}

/// Writes the rolled-out files that differ; returns how many.
async fn fetch(shared: &Shared, dir: &Path) -> redis::RedisResult<usize> {
    let mut written = 0;
    let mut conn = shared.link.get().await?;
    let wanted: Vec<(String, String)> = conn.hgetall(CHANNEL).await?;
    for (name, sha) in wanted {
        if !plain_name(&name) {
            tracing::warn!(%name, "cluster: a rolled-out file with a name that is not plain, skipped");
            continue;
        }
        let path = dir.join(&name);
        let current = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || std::fs::read(path).ok().map(|b| content_hash(&b)))
                .await
                .ok()
                .flatten()
        };
        if current.as_deref() == Some(sha.as_str()) {
            continue;
        }
        let bytes: Option<Vec<u8>> = conn.get(artifact_key(&sha)).await?;
        let Some(bytes) = bytes.filter(|b| content_hash(b) == sha) else {
            tracing::warn!(%name, %sha, "cluster: a rolled-out file's content is missing or does not match its hash");
            continue;
        };
        let staging = dir.join(format!(".{name}.rollout"));
        let outcome = tokio::task::spawn_blocking(move || {
            std::fs::write(&staging, bytes).and_then(|()| std::fs::rename(&staging, &path))
        })
        .await;
        match outcome {
            Ok(Ok(())) => {
                written += 1;
                tracing::info!(%name, %sha, "cluster: wrote a rolled-out file");
            }
            Ok(Err(e)) => tracing::warn!(%name, "cluster: cannot write a rolled-out file: {e}"),
            Err(e) => tracing::warn!(%name, "cluster: cannot write a rolled-out file: {e}"),
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_file_names_are_rolled_out() {
        assert!(plain_name("chat.toml"));
        assert!(plain_name("chat.wasm"));
        for bad in ["", ".hidden", "../x.toml", "a/b.toml", "/etc/passwd", ".."] {
            assert!(!plain_name(bad), "{bad:?}");
        }
        assert_eq!(
            content_hash(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
