//! Node leases: each node renews its lease in Redis every third of its length, and ends the
//! nodes whose lease ran out (their members leave their rooms, on every node). A node that
//! finds its own lease was ended (it lost Redis for longer than the lease, or Redis lost its
//! data) announces its members again.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::watch;

use super::{Cluster, Shared};
use crate::router::Hub;

/// What a lease renewal learned.
pub struct Beat {
    /// This node's lease was new (it had been ended, or never begun).
    pub new: bool,
    /// The nodes it ended.
    pub ended: Vec<String>,
    /// Every live node's plugin versions (node, JSON object plugin → version).
    pub versions: Vec<(String, String)>,
    /// The members of the nodes ended: (room, connection id, identity).
    pub left: Vec<(String, String, String)>,
}

/// Renews this node's lease (`stay`) and stores its plugin versions (`versions`, a JSON object),
/// or ends its lease now; ends the dead nodes' leases.
pub async fn beat(shared: &Shared, stay: bool, versions: &str) -> redis::RedisResult<Beat> {
    let mut conn = shared.link.get().await?;
    let lease_ms = u64::try_from(shared.config.node_ttl.as_millis()).unwrap_or(u64::MAX);
    type Answer = (u8, Vec<String>, Vec<(String, String)>, Vec<String>);
    let (added, ended, versions, left): Answer = shared
        .link
        .scripts
        .beat
        .arg(&*shared.node)
        .arg(lease_ms)
        .arg(format!("{:016x}", rand::random::<u64>()))
        .arg(shared.config.stream_length)
        .arg(shared.config.room_ttl.as_secs().max(1))
        .arg(if stay { "1" } else { "0" })
        .arg(versions)
        .arg(shared.resume_ttl.as_millis().max(1) as u64)
        .invoke_async(&mut conn)
        .await?;
    Ok(Beat {
        new: added == 1,
        ended,
        versions,
        left: left
            .chunks_exact(3)
            .map(|m| (m[0].clone(), m[1].clone(), m[2].clone()))
            .collect(),
    })
}

pub async fn run(cluster: Arc<Cluster>, hub: Arc<Hub>, mut shutdown: watch::Receiver<bool>) {
    let shared = &cluster.shared;
    let period = (shared.config.node_ttl / 3).max(std::time::Duration::from_millis(100));
    let mut began = false;
    loop {
        let versions: serde_json::Map<String, serde_json::Value> = hub
            .registry
            .report()
            .into_iter()
            .map(|p| (p.id, p.version.into()))
            .collect();
        let versions = serde_json::Value::Object(versions).to_string();
        let result = beat(shared, true, &versions).await;
        shared.link.outcome(&result).await;
        match result {
            Ok(Beat {
                new,
                ended,
                versions,
                left,
            }) => {
                cluster.set_versions(versions);
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
                // This node ended them: the plugins hear it once, here.
                for (room, connection_id, identity) in left {
                    let payload = serde_json::json!({
                        "room": room,
                        "connectionId": connection_id,
                        "identity": identity,
                        "reason": "node_lost",
                    });
                    crate::router::fire_event(
                        &hub,
                        None,
                        crate::manifest::HostEvent::RoomLeft,
                        Some(&room),
                        &payload,
                        0,
                    )
                    .await;
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
