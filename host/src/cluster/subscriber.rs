//! The subscriber: one task owns the pub/sub connection. It subscribes to this node's channel
//! and to the channel of every room this node serves, and delivers what the other nodes
//! publish, once each, in each room's offset order. A room is brought in sync when it is first
//! served and after every reconnection: its members (a snapshot), then the publications since
//! the last one delivered, read from the room's stream. Redis pub/sub is at most once, so an
//! offset that skips ahead is repaired from the stream too; what the stream no longer holds is
//! told to the room's members on this node (`room.gap`).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures_util::StreamExt;
use redis::RedisResult;
use redis::aio::PubSubSink;
use serde_json::json;
use tokio::sync::{mpsc, oneshot, watch};

use super::link::{Backoff, CONNECT_TIMEOUT};
use super::wire::{self, Kind};
use super::{Shared, channel_of_node, channel_of_room, stream_of_room};
use crate::protocol::{self, Frame};
use crate::rooms::MemberInfo;
use crate::router::Hub;

/// What the rooms ask of the subscriber.
#[derive(Debug)]
pub enum Command {
    /// Receive a room's traffic (its first member on this node joined).
    Serve(Arc<str>),
    /// Stop (its last member on this node left).
    Unserve(Arc<str>),
    /// Answered once the room's traffic reaches this node (or at once while Redis is down).
    Ready(oneshot::Sender<()>),
}

/// Where this node is in a room's stream.
#[derive(Debug, Default)]
struct Feed {
    /// The stream's epoch (empty until known): a new one means the stream was lost and begun
    /// again.
    epoch: String,
    /// The offset of the last publication delivered.
    offset: u64,
    /// The number of the last publication delivered from each origin node.
    origins: HashMap<String, u64>,
}

struct Subscriber {
    shared: Arc<Shared>,
    hub: Arc<Hub>,
    /// The rooms served, and where this node is in each (`None`: not in sync yet).
    served: HashMap<Arc<str>, Option<Feed>>,
    own_channel: String,
}

pub async fn run(
    shared: Arc<Shared>,
    hub: Arc<Hub>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    mut shutdown: watch::Receiver<bool>,
) {
    let own_channel = channel_of_node(&shared.node);
    let mut me = Subscriber {
        shared,
        hub,
        served: HashMap::new(),
        own_channel,
    };
    let mut backoff = Backoff::default();
    loop {
        let connected =
            tokio::time::timeout(CONNECT_TIMEOUT, me.shared.link.client.get_async_pubsub()).await;
        let pubsub = match connected {
            Ok(Ok(pubsub)) => Some(pubsub),
            Ok(Err(e)) => {
                tracing::debug!("cluster: subscribing failed: {e}");
                None
            }
            Err(_) => None,
        };
        if let Some(pubsub) = pubsub {
            let (mut sink, mut stream) = pubsub.split();
            match me.sync_all(&mut sink).await {
                Ok(()) => {
                    backoff.reset();
                    me.shared.stats.subscribed.store(true, Ordering::Release);
                    tracing::info!(rooms = me.served.len(), "cluster: subscribed");
                    loop {
                        let outcome = tokio::select! {
                            command = commands.recv() => match command {
                                Some(command) => me.command(&mut sink, command).await,
                                None => return,
                            },
                            message = stream.next() => match message {
                                Some(message) => me.message(&mut sink, &message).await,
                                None => Err(redis::RedisError::from((
                                    redis::ErrorKind::Io,
                                    "the subscription connection closed",
                                ))),
                            },
                            () = crate::server::stopped(&mut shutdown) => return,
                        };
                        if let Err(e) = outcome {
                            tracing::warn!("cluster: subscription lost, subscribing again: {e}");
                            break;
                        }
                    }
                }
                Err(e) => tracing::debug!("cluster: subscribing failed: {e}"),
            }
        }
        me.shared.stats.subscribed.store(false, Ordering::Release);
        // Until Redis answers again: keep track of the rooms served, and answer joins at once.
        let wait = tokio::time::sleep(backoff.next());
        tokio::pin!(wait);
        loop {
            tokio::select! {
                () = &mut wait => break,
                command = commands.recv() => match command {
                    Some(command) => me.offline(command),
                    None => return,
                },
                () = crate::server::stopped(&mut shutdown) => return,
            }
        }
    }
}

impl Subscriber {
    fn offline(&mut self, command: Command) {
        match command {
            Command::Serve(room) => {
                self.served.insert(room, None);
            }
            Command::Unserve(room) => {
                self.served.remove(&room);
                self.hub.rooms.set_remote(&room, None);
            }
            Command::Ready(done) => {
                let _ = done.send(());
            }
        }
        self.count_served();
    }

    fn count_served(&self) {
        self.shared
            .stats
            .served
            .store(self.served.len(), Ordering::Relaxed);
    }

    async fn command(&mut self, sink: &mut PubSubSink, command: Command) -> RedisResult<()> {
        match command {
            Command::Serve(room) => {
                self.served.insert(room.clone(), None);
                self.count_served();
                self.sync(sink, &room).await?;
            }
            Command::Unserve(room) => {
                self.served.remove(&room);
                self.count_served();
                self.hub.rooms.set_remote(&room, None);
                sink.unsubscribe(channel_of_room(&room)).await?;
            }
            Command::Ready(done) => {
                let _ = done.send(());
            }
        }
        Ok(())
    }

    async fn sync_all(&mut self, sink: &mut PubSubSink) -> RedisResult<()> {
        sink.subscribe(&self.own_channel).await?;
        // Rollouts announced while this node was away are caught up now.
        sink.subscribe(super::rollout::CHANNEL).await?;
        tokio::spawn(super::rollout::follow(
            self.shared.clone(),
            self.hub.clone(),
        ));
        let rooms: Vec<Arc<str>> = self.served.keys().cloned().collect();
        for room in rooms {
            self.sync(sink, &room).await?;
        }
        Ok(())
    }

    /// Brings a served room in sync: reads its members and offset, subscribes, and delivers
    /// what was published since the last publication delivered (or since the read, for a room
    /// newly served).
    async fn sync(&mut self, sink: &mut PubSubSink, room: &Arc<str>) -> RedisResult<()> {
        if !self.served.contains_key(room) {
            return Ok(());
        }
        let mut conn = self.shared.link.get().await?;
        let snapshot: RedisResult<(String, u64, Vec<String>)> = self
            .shared
            .link
            .scripts
            .snapshot
            .arg(&**room)
            .invoke_async(&mut conn)
            .await;
        self.shared.link.outcome(&snapshot).await;
        let (epoch, offset, fields) = snapshot?;
        sink.subscribe(channel_of_room(room)).await?;
        let members = fields
            .chunks_exact(2)
            .filter_map(|pair| {
                let (node, identity) = wire::split_member(&pair[1])?;
                (node != &*self.shared.node).then(|| MemberInfo {
                    connection_id: Arc::from(pair[0].as_str()),
                    identity: Arc::from(identity),
                })
            })
            .collect();
        self.hub.rooms.set_remote(room, Some(members));
        // Where this node was stays until now: a sync that fails half-way starts again from it.
        let previous = self.served.get_mut(room).and_then(Option::take);
        let (feed, from) = match previous {
            None => (
                Feed {
                    epoch,
                    offset,
                    origins: HashMap::new(),
                },
                offset + 1,
            ),
            Some(feed) if feed.epoch == epoch || feed.epoch.is_empty() => {
                let from = feed.offset + 1;
                (Feed { epoch, ..feed }, from)
            }
            Some(feed) => {
                // The stream was lost and begun again (Redis restarted without its data, or the
                // room sat idle past its time to live): deliver the new one from its start.
                tracing::info!(%room, "cluster: the room's stream began again");
                (
                    Feed {
                        epoch,
                        offset: 0,
                        origins: feed.origins,
                    },
                    1,
                )
            }
        };
        self.served.insert(room.clone(), Some(feed));
        self.catch_up(room, from, Some(offset)).await
    }

    /// Delivers the room's publications from offset `from` on, read from its stream; what the
    /// stream no longer holds (before its first entry, or up to `top` when it holds nothing
    /// after `from`) is told to the room's members as lost.
    async fn catch_up(&mut self, room: &Arc<str>, from: u64, top: Option<u64>) -> RedisResult<()> {
        let mut conn = self.shared.link.get().await?;
        let entries: RedisResult<Vec<(String, Vec<String>)>> = redis::cmd("XRANGE")
            .arg(stream_of_room(room))
            .arg(format!("0-{from}"))
            .arg("+")
            .query_async(&mut conn)
            .await;
        self.shared.link.outcome(&entries).await;
        let mut expected = from;
        for (id, fields) in entries? {
            let Some(offset) = super::entry_number(&id) else {
                continue;
            };
            if offset > expected {
                self.lost(room, offset - expected);
            }
            if let Some(text) = fields.get(1) {
                self.apply(room, offset, text);
            }
            expected = expected.max(offset + 1);
        }
        if let Some(top) = top
            && top >= expected
        {
            self.lost(room, top - expected + 1);
            if let Some(Some(feed)) = self.served.get_mut(room) {
                feed.offset = feed.offset.max(top);
            }
        }
        Ok(())
    }

    fn lost(&self, room: &str, missed: u64) {
        self.shared.stats.lost.fetch_add(missed, Ordering::Relaxed);
        tracing::warn!(%room, missed, "cluster: publications missed for good (no longer in the room's stream)");
        let frame = protocol::host_frame(
            "room.gap",
            Some(room),
            &json!({"room": room, "missed": missed}),
        );
        self.hub.rooms.deliver(room, &frame, None, false);
    }

    async fn message(&mut self, sink: &mut PubSubSink, message: &redis::Msg) -> RedisResult<()> {
        let Ok(text) = std::str::from_utf8(message.get_payload_bytes()) else {
            tracing::warn!("cluster: a publication that is not UTF-8, dropped");
            return Ok(());
        };
        let channel = message.get_channel_name();
        if channel == self.own_channel {
            self.direct(text);
            return Ok(());
        }
        if channel == super::rollout::CHANNEL {
            tokio::spawn(super::rollout::follow(
                self.shared.clone(),
                self.hub.clone(),
            ));
            return Ok(());
        }
        let Some(room) = channel.strip_prefix("plexus:r:") else {
            return Ok(());
        };
        let Some((room, Some(feed))) = self
            .served
            .get_key_value(room)
            .map(|(r, f)| (r.clone(), f.as_ref()))
        else {
            // A publication of a room this node stopped serving.
            return Ok(());
        };
        let (epoch, offset, publication) = match wire::split_relayed(text) {
            Ok(parts) => parts,
            Err(e) => {
                tracing::warn!(%room, "cluster: {e}");
                return Ok(());
            }
        };
        if !feed.epoch.is_empty() && feed.epoch != epoch {
            return self.sync(sink, &room).await;
        }
        let behind = feed.offset;
        tracing::trace!(%room, epoch, offset, behind, "cluster: a publication");
        if offset <= behind {
            return Ok(());
        }
        if offset > behind + 1 {
            // Redis did not relay what came between: read it back from the stream.
            self.shared.stats.repairs.fetch_add(1, Ordering::Relaxed);
            self.catch_up(&room, behind + 1, None).await?;
        }
        if let Some(Some(feed)) = self.served.get_mut(&room)
            && feed.epoch.is_empty()
        {
            feed.epoch = epoch.to_owned();
        }
        self.apply(&room, offset, publication);
        Ok(())
    }

    /// Delivers one publication of a room at `offset`, unless it was delivered already.
    fn apply(&mut self, room: &str, offset: u64, text: &str) {
        let Some(Some(feed)) = self.served.get_mut(room) else {
            return;
        };
        if offset <= feed.offset {
            return;
        }
        feed.offset = offset;
        let publication = match wire::decode(text) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(%room, "cluster: {e}");
                return;
            }
        };
        let own = publication.origin == &*self.shared.node;
        if own && !matches!(publication.kind, Kind::Frame { ordered: true, .. }) {
            // This node applied it when it published it.
            return;
        }
        if publication.number != 0 {
            let last = feed
                .origins
                .entry(publication.origin.to_owned())
                .or_default();
            if publication.number <= *last {
                self.shared.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                return;
            }
            *last = publication.number;
        }
        let rooms = &self.hub.rooms;
        match publication.kind {
            Kind::Frame {
                except,
                volatile,
                body,
                ..
            } => {
                if !own {
                    self.shared.stats.received.fetch_add(1, Ordering::Relaxed);
                }
                let frame = Frame::from(body);
                match self.served.get_key_value(room) {
                    Some((room, _)) if !volatile => {
                        rooms.deliver_at(room, &frame, except, offset);
                    }
                    _ => {
                        rooms.deliver(room, &frame, except, volatile);
                    }
                }
            }
            Kind::Joined {
                connection_id,
                identity,
            } => rooms.remote_joined(
                room,
                MemberInfo {
                    connection_id: Arc::from(connection_id),
                    identity: Arc::from(identity),
                },
            ),
            Kind::Left { connection_id } => {
                let gone = rooms.remote_left(room, connection_id);
                if let (0, Some(member)) = (publication.number, gone) {
                    // Its node died: no `room.left` came from it. Each node tells its own
                    // members, so that every member hears it once.
                    let frame = node_lost(room, &member.connection_id, Some(&member.identity));
                    rooms.deliver(room, &frame, None, false);
                }
            }
            Kind::Offline { identity } => {
                let frame = crate::lifecycle::presence_frame(room, identity, "offline", None);
                rooms.deliver(room, &frame, None, false);
            }
        }
    }

    /// A frame another node sent to a connection of this node.
    fn direct(&self, text: &str) {
        let Some((connection_id, body)) = wire::split_direct(text) else {
            tracing::warn!("cluster: a malformed direct frame, dropped");
            return;
        };
        if connection_id == wire::REPLY {
            let Some((reference, from, answer)) = wire::split_reply(body) else {
                tracing::warn!("cluster: a malformed forwarded answer, dropped");
                return;
            };
            let Ok(answer) = serde_json::value::RawValue::from_string(answer.to_owned()) else {
                tracing::warn!("cluster: a forwarded answer that is not JSON, dropped");
                return;
            };
            if let Err(e) = self.hub.registry.requests().reply(reference, from, &answer) {
                tracing::debug!(%reference, "cluster: a forwarded answer was refused: {e}");
            }
            return;
        }
        if connection_id == super::sessions::RELEASE {
            if let Some(cluster) = self.hub.cluster.get() {
                tokio::spawn(super::sessions::release(
                    cluster.clone(),
                    self.hub.clone(),
                    body.to_owned(),
                ));
            }
            return;
        }
        match self.hub.sessions.get(connection_id) {
            Some(session) => {
                self.shared.stats.direct.fetch_add(1, Ordering::Relaxed);
                session.outbox.push(Frame::from(body));
            }
            None => {
                tracing::debug!(%connection_id, "cluster: a direct frame for a connection that is gone")
            }
        }
    }
}

/// The `room.left` a room's members get for a member whose node died (reason `node_lost`), with
/// its identity when this node knew it.
pub(super) fn node_lost(room: &str, connection_id: &str, identity: Option<&str>) -> Frame {
    let mut payload = json!({
        "room": room,
        "connectionId": connection_id,
        "reason": "node_lost",
    });
    if let Some(identity) = identity {
        payload["identity"] = identity.into();
    }
    protocol::host_frame("room.left", Some(room), &payload)
}
