//! Node leases: each node renews its lease in Redis every third of its length, and ends the
//! nodes whose lease ran out (their members leave their rooms, on every node). A node that
//! finds its own lease was ended (it lost Redis for longer than the lease, or Redis lost its
//! data) announces its members again.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::watch;

use super::{Cluster, Shared};
use crate::router::Hub;

/// Renews this node's lease (`stay`) or ends it now, and ends the dead nodes'. Returns whether
/// this node's lease was new, and the nodes ended.
pub async fn beat(shared: &Shared, stay: bool) -> redis::RedisResult<(bool, Vec<String>)> {
    let mut conn = shared.link.get().await?;
    let lease_ms = u64::try_from(shared.config.node_ttl.as_millis()).unwrap_or(u64::MAX);
    let (added, ended): (u8, Vec<String>) = shared
        .link
        .scripts
        .beat
        .arg(&*shared.node)
        .arg(lease_ms)
        .arg(format!("{:016x}", rand::random::<u64>()))
        .arg(shared.config.stream_length)
        .arg(shared.config.room_ttl.as_secs().max(1))
        .arg(if stay { "1" } else { "0" })
        .invoke_async(&mut conn)
        .await?;
    Ok((added == 1, ended))
}

pub async fn run(cluster: Arc<Cluster>, hub: Arc<Hub>, mut shutdown: watch::Receiver<bool>) {
    let shared = &cluster.shared;
    let period = (shared.config.node_ttl / 3).max(std::time::Duration::from_millis(100));
    let mut began = false;
    loop {
        let result = beat(shared, true).await;
        shared.link.outcome(&result).await;
        match result {
            Ok((new, ended)) => {
                if new && began {
                    tracing::warn!(
                        "cluster: this node's lease had ended (Redis was out of reach or lost its data): announcing its members again"
                    );
                    for (room, member) in hub.rooms.local_members() {
                        crate::rooms::RoomBus::joined(&*cluster, &room, &member);
                    }
                }
                began = true;
                for node in &ended {
                    tracing::warn!(%node, "cluster: a node's lease ran out: its members left their rooms");
                }
                shared
                    .stats
                    .nodes_ended
                    .fetch_add(ended.len() as u64, Ordering::Relaxed);
            }
            Err(e) => tracing::debug!("cluster: renewing the lease failed: {e}"),
        }
        tokio::select! {
            () = tokio::time::sleep(period) => {}
            () = crate::server::stopped(&mut shutdown) => return,
        }
    }
}
