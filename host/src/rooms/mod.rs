//! Rooms: membership and fan-out. A broadcast is serialized once by the caller and its bytes
//! are shared by every recipient. With a cluster, [`RoomBus`] (declared here, implemented by
//! `crate::cluster`) carries every fan-out and membership change to the other nodes, and this
//! module keeps the members the other nodes reported for the rooms this node serves.

pub mod presence;

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use dashmap::DashMap;

use crate::protocol::Frame;
use crate::session::Session;
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
    /// A fan-out this node's members already got, for the members on the other nodes.
    fn publish(
        &self,
        room: &str,
        frame: &Frame,
        except: Option<&str>,
        volatile: bool,
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

/// All rooms of this host.
#[derive(Debug, Default)]
pub struct Rooms {
    rooms: DashMap<Arc<str>, HashMap<Arc<str>, Arc<Session>>>,
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
        let mut members = self.rooms.entry(Arc::from(room)).or_default();
        if members.contains_key(&session.connection_id) {
            return Ok(false);
        }
        let elsewhere = self.remote.get(room).map_or(0, |r| r.len());
        if members.len() + elsewhere >= max_members {
            let empty = members.is_empty();
            drop(members);
            if empty {
                self.rooms.remove_if(room, |_, members| members.is_empty());
            }
            return Err(RoomFull);
        }
        members.insert(session.connection_id.clone(), session.clone());
        if let Some(bus) = self.bus.get() {
            // Under the room's guard, so that the bus sees a room's first join and last leave
            // in the order they happened.
            if members.len() == 1 {
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
        Ok(true)
    }

    /// Removes a session from a room. Returns false when it was not a member.
    pub fn leave(&self, room: &str, connection_id: &str) -> bool {
        let removed = match self.rooms.get_mut(room) {
            Some(mut members) => {
                let removed = members.remove(connection_id).is_some();
                if removed && let Some(bus) = self.bus.get() {
                    bus.left(room, connection_id);
                    if members.is_empty() {
                        bus.unserve(room);
                    }
                }
                removed
            }
            None => false,
        };
        self.rooms.remove_if(room, |_, members| members.is_empty());
        removed
    }

    /// The members of a room on every node (as far as this node knows the others: it keeps
    /// them for the rooms it serves), sorted by connection id.
    pub fn members(&self, room: &str) -> Vec<MemberInfo> {
        let mut list: Vec<MemberInfo> = self.rooms.get(room).map_or_else(Vec::new, |members| {
            members
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
            for session in entry.value().values() {
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
        let delivered = self.fan_out(room, frame, except, Outbox::push);
        if let Some(bus) = self.bus.get() {
            bus.publish(room, frame, except, false, origin);
        }
        delivered
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
        let delivered = self.fan_out(room, frame, except, Outbox::push_volatile);
        if let Some(bus) = self.bus.get() {
            bus.publish(room, frame, except, true, origin);
        }
        delivered
    }

    /// Delivers a fan-out published by another node to this node's members.
    pub fn deliver(
        &self,
        room: &str,
        frame: &Frame,
        except: Option<&str>,
        volatile: bool,
    ) -> usize {
        let push = if volatile {
            Outbox::push_volatile
        } else {
            Outbox::push
        };
        self.fan_out(room, frame, except, push)
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

    fn fan_out(
        &self,
        room: &str,
        frame: &Frame,
        except: Option<&str>,
        push: fn(&Outbox, Frame) -> bool,
    ) -> usize {
        let Some(members) = self.rooms.get(room) else {
            return 0;
        };
        let mut delivered = 0;
        for (id, session) in members.iter() {
            if except == Some(&**id) {
                continue;
            }
            if push(&session.outbox, frame.clone()) {
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
