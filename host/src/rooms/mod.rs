//! Rooms: membership and fan-out. A broadcast is serialized once by the caller and its bytes
//! are shared by every recipient. With a cluster, [`RoomBus`] (declared here, implemented by
//! `crate::cluster`) carries every fan-out and membership change to the other nodes, and this
//! module keeps the members the other nodes reported for the rooms this node serves.

pub mod presence;

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

use dashmap::DashMap;

use crate::protocol::Frame;
use crate::session::Session;
use crate::session::journal::Source;
use crate::session::outbox::Outbox;

/// A member of a room, as plugins and clients see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberInfo {
    pub connection_id: Arc<str>,
    pub identity: Arc<str>,
}

/// A join refused because the room has as many members as it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoomFull;

/// Identities online in a room, with their statuses.
pub type OnlineList = Vec<(Arc<str>, Option<Arc<str>>)>;

/// What carries a room's traffic to the other nodes of a cluster. Every call is synchronous and
/// cheap (it queues work for the bus's own tasks), so that rooms can call it where they decide,
/// in the order they decide.
pub trait RoomBus: Send + Sync + std::fmt::Debug {
    /// The first member of `room` on this node joined: receive the room's traffic.
    fn serve(&self, room: &str);
    /// The last member of `room` on this node left.
    fn unserve(&self, room: &str);
    /// Waits (bounded) until the room's traffic from the other nodes reaches this node, so that
    /// a join's ack means the member gets every frame published after it.
    fn ready(&self, room: &str) -> futures_util::future::BoxFuture<'static, ()>;
    /// A member joined or left on this node.
    fn joined(&self, room: &str, member: &MemberInfo);
    fn left(&self, room: &str, connection_id: &str);
    /// Whether the bus hands this node's own non-volatile fan-outs back to it in the room's
    /// order (so that every member on every node gets a room's frames in one order): then this
    /// node's members get them from the bus, not at once. False while the other nodes are out
    /// of reach.
    fn orders(&self) -> bool;
    /// A fan-out for the members on the other nodes (`ordered`: and for this node's, through
    /// [`Rooms::deliver_at`]; otherwise they got it already).
    fn publish(
        &self,
        room: &str,
        frame: &Frame,
        except: Option<&str>,
        volatile: bool,
        ordered: bool,
        origin: Option<&Outbox>,
    );
    /// An identity came online (`online`) or went offline on this node in `room` (after its
    /// grace period); resolves to whether that changed it in the whole cluster, which is then
    /// told to the room once.
    fn presence(
        &self,
        room: &str,
        identity: &str,
        online: bool,
    ) -> futures_util::future::BoxFuture<'static, bool>;
    /// The identities online in `room` on any node, with their statuses (`None`: unknown, Redis
    /// is out of reach).
    fn online(&self, room: &str) -> futures_util::future::BoxFuture<'static, Option<OnlineList>>;
    /// An identity set its status (`None`: cleared).
    fn set_status(&self, identity: &str, status: Option<&str>);
}

/// One room's members on this node, behind a lock of its own: a fan-out holds this room's read
/// lock only, so that joins and leaves of the other rooms (in the same map shard) go on.
#[derive(Debug, Default)]
struct Room {
    members: RwLock<Members>,
}

#[derive(Debug, Default)]
struct Members {
    sessions: HashMap<Arc<str>, Arc<Session>>,
    /// The room was taken out of the map (it emptied): a join that still holds it must look
    /// the room up again.
    removed: bool,
}

impl Room {
    fn read(&self) -> RwLockReadGuard<'_, Members> {
        // Every critical section leaves the map consistent.
        self.members.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Members> {
        self.members.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// All rooms of this host.
#[derive(Debug, Default)]
pub struct Rooms {
    rooms: DashMap<Arc<str>, Arc<Room>>,
    /// The members on other nodes of the rooms this node serves, as the bus reported them.
    remote: DashMap<Arc<str>, HashMap<Arc<str>, MemberInfo>>,
    bus: OnceLock<Arc<dyn RoomBus>>,
}

impl Rooms {
    /// Connects the rooms to the other nodes of a cluster (once, before the first join).
    pub fn set_bus(&self, bus: Arc<dyn RoomBus>) {
        if self.bus.set(bus).is_err() {
            tracing::error!("a second room bus was refused");
        }
    }

    /// The bus to the other nodes, when this node is part of a cluster.
    pub fn bus(&self) -> Option<&Arc<dyn RoomBus>> {
        self.bus.get()
    }

    /// Adds a session to a room holding fewer than `max_members` (on every node). Returns false
    /// when it was already a member, and `RoomFull` when the room is full.
    pub fn join(
        &self,
        room: &str,
        session: &Arc<Session>,
        max_members: usize,
    ) -> Result<bool, RoomFull> {
        loop {
            let entry = self.rooms.entry(Arc::from(room)).or_default().clone();
            let mut members = entry.write();
            if members.removed {
                // Emptied and taken out meanwhile: join the room that replaces it.
                continue;
            }
            if members.sessions.contains_key(&session.connection_id) {
                return Ok(false);
            }
            let elsewhere = self.remote.get(room).map_or(0, |r| r.len());
            if members.sessions.len() + elsewhere >= max_members {
                drop(members);
                self.forget_if_empty(room, &entry);
                return Err(RoomFull);
            }
            members
                .sessions
                .insert(session.connection_id.clone(), session.clone());
            if let Some(bus) = self.bus.get() {
                // Under the room's lock, so that the bus sees a room's first join and last
                // leave in the order they happened.
                if members.sessions.len() == 1 {
                    bus.serve(room);
                }
                bus.joined(
                    room,
                    &MemberInfo {
                        connection_id: session.connection_id.clone(),
                        identity: session.identity.0.clone(),
                    },
                );
            }
            return Ok(true);
        }
    }

    /// Removes a session from a room. Returns false when it was not a member.
    pub fn leave(&self, room: &str, connection_id: &str) -> bool {
        let Some(entry) = self.rooms.get(room).map(|r| r.clone()) else {
            return false;
        };
        let mut members = entry.write();
        let removed = members.sessions.remove(connection_id).is_some();
        if removed && let Some(bus) = self.bus.get() {
            bus.left(room, connection_id);
            if members.sessions.is_empty() {
                bus.unserve(room);
            }
        }
        drop(members);
        self.forget_if_empty(room, &entry);
        removed
    }

    /// Removes a session from a room on this node only, without telling the other nodes: it
    /// moves to another node, which joins it again there.
    pub fn forget(&self, room: &str, connection_id: &str) {
        let Some(entry) = self.rooms.get(room).map(|r| r.clone()) else {
            return;
        };
        let mut members = entry.write();
        if members.sessions.remove(connection_id).is_some()
            && members.sessions.is_empty()
            && let Some(bus) = self.bus.get()
        {
            bus.unserve(room);
        }
        drop(members);
        self.forget_if_empty(room, &entry);
    }

    /// Takes `room` out of the map if it has no member (marked, for a join holding it).
    fn forget_if_empty(&self, room: &str, entry: &Arc<Room>) {
        self.rooms.remove_if(room, |_, held| {
            if !Arc::ptr_eq(held, entry) {
                return false;
            }
            let mut members = held.write();
            if members.sessions.is_empty() {
                members.removed = true;
            }
            members.removed
        });
    }

    /// The members of a room on every node (as far as this node knows the others: it keeps
    /// them for the rooms it serves), sorted by connection id.
    pub fn members(&self, room: &str) -> Vec<MemberInfo> {
        let entry = self.rooms.get(room).map(|r| r.clone());
        let mut list: Vec<MemberInfo> = entry.map_or_else(Vec::new, |entry| {
            entry
                .read()
                .sessions
                .values()
                .map(|s| MemberInfo {
                    connection_id: s.connection_id.clone(),
                    identity: s.identity.0.clone(),
                })
                .collect()
        });
        if let Some(remote) = self.remote.get(room) {
            list.extend(remote.values().cloned());
        }
        list.sort_by(|a, b| a.connection_id.cmp(&b.connection_id));
        list
    }

    /// The members of every room on this node, for a bus announcing them again.
    pub fn local_members(&self) -> Vec<(Arc<str>, MemberInfo)> {
        let mut all = Vec::new();
        for entry in self.rooms.iter() {
            for session in entry.value().read().sessions.values() {
                all.push((
                    entry.key().clone(),
                    MemberInfo {
                        connection_id: session.connection_id.clone(),
                        identity: session.identity.0.clone(),
                    },
                ));
            }
        }
        all
    }

    /// Queues `frame` to every member of `room` except `except`, on every node. `origin` is the
    /// session that caused it, told if the other nodes cannot be reached. Returns how many
    /// members of this node got it.
    pub fn broadcast(
        &self,
        room: &str,
        frame: &Frame,
        except: Option<&str>,
        origin: Option<&Outbox>,
    ) -> usize {
        self.fan_out_everywhere(room, frame, except, false, origin)
    }

    /// Like [`Rooms::broadcast`] for a volatile frame, which a member whose outbox is half full
    /// does not get (see [`Outbox::push_volatile`]).
    pub fn broadcast_volatile(
        &self,
        room: &str,
        frame: &Frame,
        except: Option<&str>,
        origin: Option<&Outbox>,
    ) -> usize {
        self.fan_out_everywhere(room, frame, except, true, origin)
    }

    fn fan_out_everywhere(
        &self,
        room: &str,
        frame: &Frame,
        except: Option<&str>,
        volatile: bool,
        origin: Option<&Outbox>,
    ) -> usize {
        let Some(bus) = self.bus.get() else {
            return self.deliver(room, frame, except, volatile);
        };
        let ordered = !volatile && bus.orders();
        let delivered = if ordered {
            0
        } else {
            self.deliver(room, frame, except, volatile)
        };
        bus.publish(room, frame, except, volatile, ordered, origin);
        delivered
    }

    /// Queues a fan-out to this node's members only (one published by another node, or this
    /// node's own before it is published).
    pub fn deliver(
        &self,
        room: &str,
        frame: &Frame,
        except: Option<&str>,
        volatile: bool,
    ) -> usize {
        if volatile {
            self.fan_out(room, except, |outbox| outbox.push_volatile(frame.clone()))
        } else {
            self.fan_out(room, except, |outbox| outbox.push(frame.clone()))
        }
    }

    /// Queues the non-volatile fan-out at `offset` of the room's stream (in a cluster) to this
    /// node's members.
    pub fn deliver_at(
        &self,
        room: &Arc<str>,
        frame: &Frame,
        except: Option<&str>,
        offset: u64,
    ) -> usize {
        let source = Source::Room { room, offset };
        self.fan_out(room, except, |outbox| {
            outbox.push_from(frame.clone(), source)
        })
    }

    /// Another node reported a member of `room` joined there.
    pub fn remote_joined(&self, room: &str, member: MemberInfo) {
        self.remote
            .entry(Arc::from(room))
            .or_default()
            .insert(member.connection_id.clone(), member);
    }

    /// Another node reported a member of `room` left there; returns it, if it was known.
    pub fn remote_left(&self, room: &str, connection_id: &str) -> Option<MemberInfo> {
        let gone = self
            .remote
            .get_mut(room)
            .and_then(|mut members| members.remove(connection_id));
        self.remote.remove_if(room, |_, members| members.is_empty());
        gone
    }

    /// Replaces what this node knows of the members of `room` on other nodes (a fresh read),
    /// or forgets them (`None`: this node no longer serves the room).
    pub fn set_remote(&self, room: &str, members: Option<Vec<MemberInfo>>) {
        match members {
            Some(list) if !list.is_empty() => {
                let map = list
                    .into_iter()
                    .map(|m| (m.connection_id.clone(), m))
                    .collect();
                self.remote.insert(Arc::from(room), map);
            }
            _ => {
                self.remote.remove(room);
            }
        }
    }

    fn fan_out(&self, room: &str, except: Option<&str>, push: impl Fn(&Outbox) -> bool) -> usize {
        let Some(entry) = self.rooms.get(room).map(|r| r.clone()) else {
            return 0;
        };
        let members = entry.read();
        let mut delivered = 0;
        for (id, session) in members.sessions.iter() {
            if except == Some(&**id) {
                continue;
            }
            if push(&session.outbox) {
                delivered += 1;
            }
        }
        delivered
    }

    /// How many rooms have members.
    pub fn len(&self) -> usize {
        self.rooms.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rooms.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::{Identity, SessionPolicy, Sessions};

    #[test]
    fn a_join_racing_the_room_emptying_is_never_lost() {
        let sessions = Sessions::default();
        let rooms = Arc::new(Rooms::default());
        let policy = SessionPolicy::default();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (rooms, session) = (rooms.clone(), sessions.open(Identity::guest(), &policy));
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        assert_eq!(rooms.join("r", &session, usize::MAX), Ok(true));
                        assert!(
                            rooms
                                .members("r")
                                .iter()
                                .any(|m| m.connection_id == session.connection_id),
                            "a join went into a room taken out of the map"
                        );
                        assert!(rooms.leave("r", &session.connection_id));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(rooms.is_empty());
    }

    #[test]
    fn join_leave_and_broadcast() {
        let sessions = Sessions::default();
        let rooms = Rooms::default();
        let policy = SessionPolicy::default();
        let a = sessions.open(Identity::guest(), &policy);
        let b = sessions.open(Identity::guest(), &policy);
        let (mut rx_a, _) = a.outbox.attach(0).unwrap();
        let (mut rx_b, _) = b.outbox.attach(0).unwrap();
        assert_eq!(rooms.join("r", &a, 2), Ok(true));
        assert_eq!(rooms.join("r", &a, 2), Ok(false));
        assert_eq!(rooms.join("r", &b, 1), Err(RoomFull));
        assert_eq!(rooms.join("r", &b, 2), Ok(true));
        assert_eq!(rooms.members("r").len(), 2);
        assert_eq!(
            rooms.broadcast("r", &"x".into(), Some(&a.connection_id), None),
            1
        );
        let mut batch = std::collections::VecDeque::new();
        assert!(rx_a.try_next(&mut batch).is_none());
        assert!(rx_b.try_next(&mut batch).is_some());
        assert!(rooms.leave("r", &a.connection_id));
        assert!(!rooms.leave("r", &a.connection_id));
        assert!(rooms.leave("r", &b.connection_id));
        assert!(rooms.is_empty());
    }
}
