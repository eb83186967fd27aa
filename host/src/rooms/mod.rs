//! Rooms: membership and fan-out. A broadcast is serialized once by the caller and its bytes
//! are shared by every recipient; this is the one place a cluster bus will sit behind.

pub mod presence;

use std::collections::HashMap;
use std::sync::Arc;

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

/// All rooms of this host.
#[derive(Debug, Default)]
pub struct Rooms {
    rooms: DashMap<Arc<str>, HashMap<Arc<str>, Arc<Session>>>,
}

impl Rooms {
    /// Adds a session to a room holding fewer than `max_members`. Returns false when it was
    /// already a member, and `RoomFull` when the room is full.
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
        if members.len() >= max_members {
            return Err(RoomFull);
        }
        members.insert(session.connection_id.clone(), session.clone());
        Ok(true)
    }

    /// Removes a session from a room. Returns false when it was not a member.
    pub fn leave(&self, room: &str, connection_id: &str) -> bool {
        let removed = match self.rooms.get_mut(room) {
            Some(mut members) => members.remove(connection_id).is_some(),
            None => false,
        };
        self.rooms.remove_if(room, |_, members| members.is_empty());
        removed
    }

    /// The members of a room, sorted by connection id.
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
        list.sort_by(|a, b| a.connection_id.cmp(&b.connection_id));
        list
    }

    /// Queues `frame` to every member of `room` except `except`. Returns how many got it.
    pub fn broadcast(&self, room: &str, frame: &Frame, except: Option<&str>) -> usize {
        self.fan_out(room, frame, except, Outbox::push)
    }

    /// Like [`Rooms::broadcast`] for a volatile frame, which a member whose outbox is half full
    /// does not get (see [`Outbox::push_volatile`]).
    pub fn broadcast_volatile(&self, room: &str, frame: &Frame, except: Option<&str>) -> usize {
        self.fan_out(room, frame, except, Outbox::push_volatile)
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
        assert_eq!(rooms.broadcast("r", &"x".into(), Some(&a.connection_id)), 1);
        let mut batch = std::collections::VecDeque::new();
        assert!(rx_a.try_next(&mut batch).is_none());
        assert!(rx_b.try_next(&mut batch).is_some());
        assert!(rooms.leave("r", &a.connection_id));
        assert!(!rooms.leave("r", &a.connection_id));
        assert!(rooms.leave("r", &b.connection_id));
        assert!(rooms.is_empty());
    }
}
