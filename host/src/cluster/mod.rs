//! The cluster: several Plexus nodes behave as one host through Redis. **Only this module talks
//! to Redis.** It implements the interfaces the rooms and the sessions declare
//! ([`crate::rooms::RoomBus`], [`crate::session::Relay`]): everything above it sees the same
//! rooms and sessions as on one node.
//!
//! - A room's fan-outs and membership changes are *publications*: the publisher task appends
//!   each to the room's stream in Redis with the next offset and relays it to the room's channel
//!   in one script ([`scripts`]), pipelined, in the order this node queued them.
//! - A node subscribes to a room's channel only while it has members there (the subscriber
//!   task). It delivers each publication of another node once, in offset order: a gap in the
//!   offsets (a publication Redis did not relay, or one sent while the subscription was down)
//!   is read back from the stream, and what the stream no longer holds is told to the members
//!   (`room.gap`).
//! - Each node holds a lease in Redis, renewed every third of its length; a node whose lease
//!   ran out is ended by the next node to renew: its members leave their rooms.
//! - Frames for a connection of another node go to that node's channel (a connection id names
//!   its node).
//! - The plugins' key-value stores live in Redis; every node keeps a replica of each, which
//!   plugin calls read, and commits calls' writes through a script that checks what they read
//!   ([`kv`], implementing [`crate::kv::KvBackend`]).

mod kv;
mod link;
mod nodes;
mod publisher;
pub mod rollout;
pub mod scripts;
pub mod sessions;
mod subscriber;
pub mod wire;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use tokio::sync::{mpsc, oneshot, watch};

use crate::protocol::Frame;
use crate::rooms::{MemberInfo, OnlineList, RoomBus};
use crate::router::Hub;
use crate::session::Relay;
use crate::session::outbox::Outbox;
use link::Link;
use publisher::{Job, RoomJob};
use subscriber::Command;

/// How a node joins a cluster (docs/operations.md, "Cluster").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// `redis://HOST:PORT[/DB]` (or `rediss://`, `redis+unix://`).
    pub redis_url: String,
    /// How long a node's lease lasts: a node that stopped renewing it (it died, or lost Redis)
    /// is ended, and its members leave their rooms, within this time plus a third of it.
    pub node_ttl: Duration,
    /// Publications each room's stream keeps (about: Redis trims in whole blocks), to repair a
    /// node's missed publications.
    pub stream_length: usize,
    /// How long an idle room's stream and offset are kept.
    pub room_ttl: Duration,
    /// How long a frame waits for Redis before it is dropped and its sender told `unavailable`.
    pub publish_timeout: Duration,
}

impl ClusterConfig {
    pub fn new(redis_url: impl Into<String>) -> ClusterConfig {
        ClusterConfig {
            redis_url: redis_url.into(),
            node_ttl: Duration::from_secs(10),
            stream_length: 1000,
            room_ttl: Duration::from_secs(24 * 3600),
            publish_timeout: Duration::from_secs(10),
        }
    }
}

/// Why a cluster could not be joined.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cluster: `{url}` is not a Redis URL: {source}")]
    BadUrl {
        url: String,
        source: redis::RedisError,
    },
}

/// What the cluster did, for `/healthz`.
#[derive(Debug, Default)]
pub struct Stats {
    /// Publications and direct frames sent.
    pub published: AtomicU64,
    /// Batches sent again after Redis failed.
    pub publish_retries: AtomicU64,
    /// Frames dropped after the publish timeout (their senders were told).
    pub dropped: AtomicU64,
    /// Publications of other nodes delivered here.
    pub received: AtomicU64,
    /// Publications received twice (a batch sent again) and dropped.
    pub duplicates: AtomicU64,
    /// Gaps repaired from a room's stream.
    pub repairs: AtomicU64,
    /// Publications missed for good (the stream no longer held them); the rooms were told.
    pub lost: AtomicU64,
    /// Direct frames delivered here.
    pub direct: AtomicU64,
    /// Nodes this node found dead and ended.
    pub nodes_ended: AtomicU64,
    /// Whether the subscription connection is up and every served room is in sync.
    pub subscribed: AtomicBool,
    /// Rooms this node serves (has members in).
    pub served: AtomicUsize,
}

/// What the cluster's tasks share.
#[derive(Debug)]
pub(crate) struct Shared {
    node: Arc<str>,
    config: ClusterConfig,
    link: Arc<Link>,
    stats: Stats,
    /// How long a session waits for a resume (the sessions of a dead node, in Redis).
    resume_ttl: Duration,
    /// Frames each session's journal keeps (about).
    journal_length: usize,
    /// The manifests directory the files rolled out through Redis are written to.
    manifests: Option<std::path::PathBuf>,
    /// One rollout is followed at a time.
    rollout_turn: tokio::sync::Mutex<()>,
}

/// This node's part in a cluster.
#[derive(Debug)]
pub struct Cluster {
    shared: Arc<Shared>,
    /// Every live node's plugin versions, as of this node's last lease renewal.
    versions: std::sync::Mutex<Vec<(String, String)>>,
    jobs: mpsc::UnboundedSender<Job>,
    commands: mpsc::UnboundedSender<Command>,
}

/// How long a join waits for its room's traffic to reach this node before it is answered
/// anyway (Redis is down: the node serves its own members).
const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// The channel of a room.
fn channel_of_room(room: &str) -> String {
    format!("plexus:r:{room}")
}

/// The channel of a node (direct frames).
fn channel_of_node(node: &str) -> String {
    format!("plexus:n:{node}")
}

/// The stream of a room's last publications.
fn stream_of_room(room: &str) -> String {
    format!("plexus:r:{room}:s")
}

/// The number an entry of one of our streams carries in its id (`0-<n>`: a room's offset, a
/// session's `seq`).
fn entry_number(id: &str) -> Option<u64> {
    id.strip_prefix("0-")?.parse().ok()
}

/// A session's record.
fn record_key(session: &str) -> String {
    format!("plexus:s:{session}")
}

/// The journal of a session's frames.
fn journal_key(session: &str) -> String {
    format!("plexus:s:{session}:j")
}

/// The offsets a connection joined its rooms at.
fn joined_key(connection_id: &str) -> String {
    format!("plexus:c:{connection_id}")
}

/// The sessions a node has.
fn sessions_of_node(node: &str) -> String {
    format!("plexus:n:{node}:s")
}

impl Cluster {
    /// Joins the cluster: starts the publisher, the subscriber and the lease, and connects the
    /// hub's rooms and sessions to them. Redis being unreachable is no error: the node serves
    /// its own connections and keeps trying.
    pub fn start(
        config: ClusterConfig,
        hub: &Arc<Hub>,
        manifests: Option<std::path::PathBuf>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Arc<Cluster>, ClusterError> {
        let client = redis::Client::open(config.redis_url.as_str()).map_err(|source| {
            ClusterError::BadUrl {
                url: config.redis_url.clone(),
                source,
            }
        })?;
        let shared = Arc::new(Shared {
            node: hub.sessions.node().clone(),
            config,
            link: Link::new(client),
            stats: Stats::default(),
            resume_ttl: hub.policy.resume_ttl,
            journal_length: hub.policy.bounds.kept_frames.max(1),
            manifests,
            rollout_turn: tokio::sync::Mutex::new(()),
        });
        let (jobs, jobs_rx) = mpsc::unbounded_channel();
        let (commands, commands_rx) = mpsc::unbounded_channel();
        tokio::spawn(publisher::run(shared.clone(), jobs_rx));
        tokio::spawn(subscriber::run(
            shared.clone(),
            hub.clone(),
            commands_rx,
            shutdown.clone(),
        ));
        let cluster = Arc::new(Cluster {
            shared,
            versions: std::sync::Mutex::default(),
            jobs,
            commands,
        });
        hub.registry.set_kv_backend(kv::ClusterKv::start(
            cluster.shared.clone(),
            shutdown.clone(),
        ));
        tokio::spawn(nodes::run(cluster.clone(), hub.clone(), shutdown));
        hub.rooms.set_bus(cluster.clone());
        hub.sessions.set_relay(cluster.clone());
        hub.sessions.set_journal(cluster.clone());
        tracing::info!(node = %cluster.shared.node, redis = %cluster.shared.config.redis_url, "cluster: joining");
        Ok(cluster)
    }

    /// This node's id.
    pub fn node(&self) -> &str {
        &self.shared.node
    }

    /// Whether Redis answers.
    pub fn is_up(&self) -> bool {
        self.shared.link.is_up() && self.shared.stats.subscribed.load(Ordering::Acquire)
    }

    /// Leaves the cluster (the host is shutting down, its sessions ended): sends what is
    /// queued, then ends this node's lease so that its remaining members leave their rooms at
    /// once. Bounded by the publish timeout.
    pub async fn leave(&self) {
        let (done, flushed) = oneshot::channel();
        let _ = self.jobs.send(Job::Flush(done));
        let bounded = async {
            let _ = flushed.await;
            let result = nodes::beat(&self.shared, false, "{}").await;
            self.shared.link.outcome(&result).await;
        };
        if tokio::time::timeout(self.shared.config.publish_timeout, bounded)
            .await
            .is_err()
        {
            tracing::warn!("cluster: left without sending everything (Redis unreachable)");
        }
    }

    /// Waits until everything queued so far was sent.
    pub async fn flush(&self) {
        let (done, flushed) = oneshot::channel();
        let _ = self.jobs.send(Job::Flush(done));
        let _ = flushed.await;
    }

    fn set_versions(&self, versions: Vec<(String, String)>) {
        *self.versions.lock().unwrap_or_else(|e| e.into_inner()) = versions;
    }

    /// Each live node's plugin versions, and the plugins whose versions differ between nodes
    /// (a rollout in progress, or a version some node refused).
    fn versions(&self) -> (serde_json::Value, Vec<String>) {
        let held = self.versions.lock().unwrap_or_else(|e| e.into_inner());
        let mut by_node = serde_json::Map::new();
        let mut seen: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> =
            Default::default();
        for (node, json) in held.iter() {
            let versions: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
            if let Some(map) = versions.as_object() {
                for (plugin, version) in map {
                    seen.entry(plugin.clone())
                        .or_default()
                        .insert(version.as_str().unwrap_or_default().to_owned());
                }
            }
            by_node.insert(node.clone(), versions);
        }
        let nodes = held.len();
        drop(held);
        let differ = seen
            .into_iter()
            .filter(|(plugin, versions)| {
                versions.len() > 1
                    || by_node.values().filter(|v| v.get(plugin).is_some()).count() != nodes
            })
            .map(|(plugin, _)| plugin)
            .collect();
        (serde_json::Value::Object(by_node), differ)
    }

    /// What `/healthz` shows.
    pub fn report(&self) -> serde_json::Value {
        let (versions, differ) = self.versions();
        let s = &self.shared.stats;
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        serde_json::json!({
            "node": &*self.shared.node,
            "redis": if self.shared.link.is_up() { "up" } else { "down" },
            "subscribed": s.subscribed.load(Ordering::Relaxed),
            "rooms": s.served.load(Ordering::Relaxed),
            "published": n(&s.published),
            "publishRetries": n(&s.publish_retries),
            "dropped": n(&s.dropped),
            "received": n(&s.received),
            "duplicates": n(&s.duplicates),
            "repairs": n(&s.repairs),
            "lost": n(&s.lost),
            "direct": n(&s.direct),
            "nodesEnded": n(&s.nodes_ended),
            "versions": versions,
            "versionsDiffer": differ,
        })
    }

    fn room_job(&self, room: &str, what: RoomJob) {
        let _ = self.jobs.send(Job::Room {
            room: Arc::from(room),
            what,
            queued: Instant::now(),
        });
    }
}

impl RoomBus for Cluster {
    fn presence(&self, room: &str, identity: &str, online: bool) -> BoxFuture<'static, bool> {
        let (shared, room, identity) = (self.shared.clone(), room.to_owned(), identity.to_owned());
        Box::pin(async move {
            let result = Cluster::count_presence(&shared, &room, &identity, online).await;
            shared.link.outcome(&result).await;
            result.unwrap_or_else(|e| {
                // Out of reach: this node decides alone (the room may hear it twice).
                tracing::debug!("cluster: presence not counted: {e}");
                true
            })
        })
    }

    fn online(&self, room: &str) -> BoxFuture<'static, Option<OnlineList>> {
        let (shared, room) = (self.shared.clone(), room.to_owned());
        Box::pin(async move {
            let result = Cluster::read_online(&shared, &room).await;
            shared.link.outcome(&result).await;
            result.ok()
        })
    }

    fn set_status(&self, identity: &str, status: Option<&str>) {
        let _ = self.jobs.send(Job::Status {
            identity: Arc::from(identity),
            status: status.map(Arc::from),
        });
    }

    fn serve(&self, room: &str) {
        let _ = self.commands.send(Command::Serve(Arc::from(room)));
    }

    fn unserve(&self, room: &str) {
        let _ = self.commands.send(Command::Unserve(Arc::from(room)));
    }

    fn ready(&self, _room: &str) -> BoxFuture<'static, ()> {
        let (done, ready) = oneshot::channel();
        let _ = self.commands.send(Command::Ready(done));
        Box::pin(async move {
            let _ = tokio::time::timeout(READY_TIMEOUT, ready).await;
        })
    }

    fn joined(&self, room: &str, member: &MemberInfo) {
        self.room_job(
            room,
            RoomJob::Joined {
                connection_id: member.connection_id.clone(),
                identity: member.identity.clone(),
            },
        );
    }

    fn left(&self, room: &str, connection_id: &str) {
        self.room_job(
            room,
            RoomJob::Left {
                connection_id: Arc::from(connection_id),
            },
        );
    }

    fn orders(&self) -> bool {
        self.is_up()
    }

    fn publish(
        &self,
        room: &str,
        frame: &Frame,
        except: Option<&str>,
        volatile: bool,
        ordered: bool,
        origin: Option<&Outbox>,
    ) {
        self.room_job(
            room,
            RoomJob::Frame {
                except: except.map(Arc::from),
                volatile,
                ordered,
                body: frame.clone(),
                origin: origin.cloned(),
            },
        );
    }
}

impl Cluster {
    async fn count_presence(
        shared: &Shared,
        room: &str,
        identity: &str,
        online: bool,
    ) -> redis::RedisResult<bool> {
        let mut conn = shared.link.get().await?;
        let changed: u8 = shared
            .link
            .scripts
            .presence
            .arg(room)
            .arg(identity)
            .arg(&*shared.node)
            .arg(if online { "1" } else { "-1" })
            .invoke_async(&mut conn)
            .await?;
        Ok(changed == 1)
    }

    async fn read_online(shared: &Shared, room: &str) -> redis::RedisResult<OnlineList> {
        let mut conn = shared.link.get().await?;
        let (counts, statuses): (Vec<String>, Vec<String>) = shared
            .link
            .scripts
            .online
            .arg(room)
            .invoke_async(&mut conn)
            .await?;
        Ok(counts
            .chunks_exact(2)
            .zip(statuses)
            .map(|(pair, status)| {
                (
                    Arc::from(pair[0].as_str()),
                    Some(status).filter(|s| !s.is_empty()).map(Arc::from),
                )
            })
            .collect())
    }
}

impl Cluster {
    /// Request `id` of this node awaits answers from connections of other nodes for `timeout`:
    /// their nodes forward the answers here ([`Cluster::forward_reply`]).
    pub fn requested(&self, id: u64, timeout: Duration) {
        let _ = self.jobs.send(Job::Requested { id, ttl: timeout });
    }

    /// A client of this node answered a request this node does not have: sends the answer to
    /// the node that asked, if one did. Returns whether it was sent.
    pub async fn forward_reply(&self, reference: &str, connection_id: &str, answer: &str) -> bool {
        let Some(id) = crate::requests::parse_ref(reference) else {
            return false;
        };
        if answer.len() > crate::requests::MAX_ANSWER_BYTES {
            // Refused here as the asking node would (unknown to it, the answer is not sent).
            return false;
        }
        let forward = async {
            let mut conn = self.shared.link.get().await?;
            let node: Option<String> = redis::cmd("GET")
                .arg(format!("plexus:q:{id}"))
                .query_async(&mut conn)
                .await?;
            let Some(node) = node.filter(|n| *n != *self.shared.node) else {
                return Ok(false);
            };
            let text = wire::reply(reference, connection_id, answer);
            redis::cmd("PUBLISH")
                .arg(channel_of_node(&node))
                .arg(text)
                .query_async::<()>(&mut conn)
                .await?;
            Ok(true)
        };
        let result: redis::RedisResult<bool> = forward.await;
        self.shared.link.outcome(&result).await;
        result.unwrap_or(false)
    }
}

impl Relay for Cluster {
    fn send(&self, node: &str, connection_id: &str, frame: &Frame) {
        let _ = self.jobs.send(Job::Direct {
            node: Arc::from(node),
            connection_id: Arc::from(connection_id),
            body: frame.clone(),
            queued: Instant::now(),
        });
    }
}
