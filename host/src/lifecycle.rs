//! The life of a session beyond one message: its connection dropping and the wait for a resume,
//! a resume taking it over, its end, and the presence each implies (grace periods). Work due
//! later (the end of a grace period or of a resume wait) is sent to the host's lifecycle task
//! ([`run`]), which owns a handle to the hub.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::{mpsc, watch};

use crate::error::CloseReason;
use crate::manifest::HostEvent;
use crate::protocol;
use crate::rooms::presence::{Departure, Online};
use crate::router::{self, Hub};
use crate::session::Session;

/// How a session ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Its client closed the connection (a WebSocket close frame).
    Closed,
    /// It waited for a resume longer than the resume TTL.
    Expired,
    /// The host is shutting down.
    Shutdown,
    /// The connection it was opened for resumed another session instead.
    Replaced,
}

impl End {
    /// The `reason` of the `room.left` frames its end sends.
    fn reason(self) -> &'static str {
        match self {
            End::Expired => "expired",
            End::Closed | End::Shutdown | End::Replaced => "disconnect",
        }
    }
}

/// Work due later.
#[derive(Debug)]
pub enum Due {
    /// The grace period `token` of `identity` in `room` is over.
    Presence {
        room: Arc<str>,
        identity: Arc<str>,
        token: u64,
    },
    /// The resume wait that began with detachment `epoch` is over.
    Expiry { session: Arc<Session>, epoch: u64 },
}

fn schedule(hub: &Hub, after: Duration, due: Due) {
    let tx = hub.due.clone();
    tokio::spawn(async move {
        tokio::time::sleep(after).await;
        let _ = tx.send(due);
    });
}

/// Does the work due later until the host shuts down.
pub async fn run(
    hub: Arc<Hub>,
    mut due: mpsc::UnboundedReceiver<Due>,
    mut stop: watch::Receiver<bool>,
) {
    // Identities idle long enough to have full buckets again are forgotten now and then.
    let mut sweep = tokio::time::interval(Duration::from_secs(60));
    loop {
        let next = tokio::select! {
            next = due.recv() => next,
            _ = sweep.tick() => {
                if let Some(rates) = &hub.identity_rates {
                    rates.forget_idle();
                }
                continue;
            }
            _ = stop.wait_for(|stopped| *stopped) => None,
        };
        match next {
            Some(Due::Presence {
                room,
                identity,
                token,
            }) => {
                if let Some(status) = hub.presence.expire(&room, &identity, token) {
                    went_offline(&hub, &room, &identity, status.as_deref()).await;
                }
            }
            Some(Due::Expiry { session, epoch }) => {
                if session.detached_since(epoch) {
                    end_session(&hub, &session, End::Expired).await;
                }
            }
            None => break,
        }
    }
}

/// `session`'s connection is present in `room`. Its identity coming online is told to the
/// room's other members (the session itself learns the room's presence from its `sys.join`
/// ack).
pub async fn arrive(hub: &Hub, room: &str, session: &Session) {
    let identity = &session.identity.0;
    if let Some(status) = hub.presence.arrive(room, identity) {
        if let Some(bus) = hub.rooms.bus()
            && !bus.presence(room, identity, true).await
        {
            // Online on another node already: the room heard it then.
            return;
        }
        let frame = presence_frame(room, identity, "online", status.as_deref());
        hub.rooms
            .broadcast(room, &frame, Some(&session.connection_id), None);
        presence_event(hub, room, identity, "online", status.as_deref()).await;
    }
}

/// A connection of `identity` is no longer present in `room`: it left, or (`grace`) dropped.
pub async fn depart(hub: &Hub, room: &str, identity: &Arc<str>, grace: bool) {
    let grace = grace && !hub.policy.presence_grace.is_zero();
    match hub.presence.depart(room, identity, grace) {
        Departure::Stays => {}
        Departure::Offline(status) => {
            went_offline(hub, room, identity, status.as_deref()).await;
        }
        Departure::Grace(token) => schedule(
            hub,
            hub.policy.presence_grace,
            Due::Presence {
                room: Arc::from(room),
                identity: identity.clone(),
                token,
            },
        ),
    }
}

/// This node's last connection of `identity` in `room` is gone: the room is told once the
/// identity is offline on every node.
async fn went_offline(hub: &Hub, room: &str, identity: &str, status: Option<&str>) {
    if let Some(bus) = hub.rooms.bus()
        && !bus.presence(room, identity, false).await
    {
        // Still online on another node.
        return;
    }
    presence_changed(hub, room, identity, "offline", status).await;
}

/// Who is online in `room`, on every node of a cluster, sorted by identity. `connections`
/// counts this node's connections and the members on other nodes.
pub async fn online(hub: &Hub, room: &str) -> Vec<Online> {
    let mut list = hub.presence.list(room);
    let Some(bus) = hub.rooms.bus() else {
        return list;
    };
    let Some(everywhere) = bus.online(room).await else {
        return list;
    };
    let members = hub.rooms.members(room);
    let elsewhere = |identity: &str| {
        members
            .iter()
            .filter(|m| &*m.identity == identity && hub.sessions.get(&m.connection_id).is_none())
            .count() as u32
    };
    for entry in &mut list {
        entry.connections += elsewhere(&entry.identity);
    }
    for (identity, status) in everywhere {
        if !list.iter().any(|o| o.identity == identity) {
            list.push(Online {
                connections: elsewhere(&identity),
                identity,
                status,
            });
        }
    }
    list.sort_by(|a, b| a.identity.cmp(&b.identity));
    list
}

/// Sets the status of an identity and tells every room it is online in.
pub async fn set_status(hub: &Hub, identity: &Arc<str>, status: Option<Arc<str>>) {
    if let Some(bus) = hub.rooms.bus() {
        bus.set_status(identity, status.as_deref());
    }
    let Some(rooms) = hub.presence.set_status(identity, status.clone()) else {
        return;
    };
    for room in rooms {
        presence_changed(hub, &room, identity, "online", status.as_deref()).await;
    }
}

/// Tells a room that an identity came online, went offline, or changed its status.
async fn presence_changed(
    hub: &Hub,
    room: &str,
    identity: &str,
    state: &str,
    status: Option<&str>,
) {
    let frame = presence_frame(room, identity, state, status);
    hub.rooms.broadcast(room, &frame, None, None);
    presence_event(hub, room, identity, state, status).await;
}

/// `presence.changed` to the plugins subscribed to it (no origin connection: it is about an
/// identity).
async fn presence_event(hub: &Hub, room: &str, identity: &str, state: &str, status: Option<&str>) {
    let payload = json!({
        "room": room,
        "identity": identity,
        "state": state,
        "status": status,
    });
    Box::pin(router::fire_event(
        hub,
        None,
        HostEvent::PresenceChanged,
        Some(room),
        &payload,
        0,
    ))
    .await;
}

pub(crate) fn presence_frame(
    room: &str,
    identity: &str,
    state: &str,
    status: Option<&str>,
) -> protocol::Frame {
    let payload = json!({
        "room": room,
        "identity": identity,
        "state": state,
        "status": status,
    });
    protocol::host_frame("presence.changed", Some(room), &payload)
}

/// The connection driving `session` is gone without closing it: the session keeps its rooms
/// and its frames and waits for a resume; its identity's presence starts a grace period.
pub async fn detached(hub: &Hub, session: &Arc<Session>) {
    let Some(epoch) = session.mark_detached() else {
        return;
    };
    for room in session.rooms() {
        depart(hub, &room, &session.identity.0, true).await;
    }
    schedule(
        hub,
        hub.policy.resume_ttl,
        Due::Expiry {
            session: session.clone(),
            epoch,
        },
    );
}

/// A session moved here from another node, not yet attached: it waits for its resume like
/// a session whose connection dropped (its presence was counted off where it was).
pub fn awaiting_resume(hub: &Hub, session: &Arc<Session>) {
    if let Some(epoch) = session.mark_detached() {
        schedule(
            hub,
            hub.policy.resume_ttl,
            Due::Expiry {
                session: session.clone(),
                epoch,
            },
        );
    }
}

/// A connection took a waiting session over: its identity is present again in its rooms.
pub async fn attached(hub: &Hub, session: &Arc<Session>) {
    for room in session.rooms() {
        arrive(hub, &room, session).await;
    }
}

/// Ends a session: no more frames are kept, it leaves its rooms (telling their members and the
/// plugins), and it is forgotten (an expired one is remembered as such for a while).
pub async fn end_session(hub: &Hub, session: &Arc<Session>, end: End) {
    let was_attached = session.is_attached();
    if !session.mark_ended() {
        return;
    }
    session.outbox.end(CloseReason::Shutdown);
    for room in session.rooms() {
        router::leave_room(hub, session, &room, end.reason(), 0).await;
        if was_attached {
            depart(hub, &room, &session.identity.0, end != End::Replaced).await;
        }
    }
    // Requests awaiting its answer report it missing now, not at their timeout.
    hub.registry.requests().ended(&session.connection_id);
    router::session_event(hub, session, HostEvent::Disconnect).await;
    hub.sessions.remove(session, end == End::Expired);
}
