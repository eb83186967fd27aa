//! Presence: which identities are online in each room. An identity is online in a room from the
//! first of its connections there until the last one leaves; a dropped connection starts a
//! grace period before it counts as gone, so that a reconnect or a resume inside it causes no
//! offline/online flap. This module only counts; the router tells the room.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// One identity in one room.
#[derive(Debug, Default)]
struct Entry {
    /// Connections of the identity present in the room.
    present: u32,
    /// The grace period running since the last one dropped, by its token.
    pending: Option<u64>,
}

#[derive(Debug, Default)]
struct Inner {
    rooms: HashMap<Arc<str>, HashMap<Arc<str>, Entry>>,
    /// The status each online identity set, and in how many rooms it is online.
    identities: HashMap<Arc<str>, (usize, Option<Arc<str>>)>,
    tokens: u64,
}

/// What a departure did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Departure {
    /// Other connections of the identity are still present.
    Stays,
    /// The identity went offline now, with the status it had.
    Offline(Option<Arc<str>>),
    /// The grace period started: call [`Presence::expire`] with this token when it is over.
    Grace(u64),
}

/// One identity online in a room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Online {
    pub identity: Arc<str>,
    pub status: Option<Arc<str>>,
    /// Its connections present in the room (0 during a grace period).
    pub connections: u32,
}

/// Presence in every room of this host.
#[derive(Debug, Default)]
pub struct Presence {
    inner: Mutex<Inner>,
}

impl Presence {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every critical section leaves the maps consistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A connection of `identity` is present in `room`. Returns the identity's status when it
    /// went online by it (not when it was online, or in its grace period).
    pub fn arrive(&self, room: &str, identity: &Arc<str>) -> Option<Option<Arc<str>>> {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let members = inner.rooms.entry(Arc::from(room)).or_default();
        let fresh = !members.contains_key(identity);
        let entry = members.entry(identity.clone()).or_default();
        entry.present += 1;
        entry.pending = None;
        if !fresh {
            return None;
        }
        let id = inner.identities.entry(identity.clone()).or_default();
        id.0 += 1;
        Some(id.1.clone())
    }

    /// A connection of `identity` is no longer present in `room`: it left (`grace` false) or
    /// dropped (`grace` true).
    pub fn depart(&self, room: &str, identity: &str, grace: bool) -> Departure {
        let mut inner = self.lock();
        let Some(entry) = inner.rooms.get_mut(room).and_then(|m| m.get_mut(identity)) else {
            return Departure::Stays;
        };
        entry.present = entry.present.saturating_sub(1);
        if entry.present > 0 || entry.pending.is_some() {
            return Departure::Stays;
        }
        if grace {
            inner.tokens += 1;
            let token = inner.tokens;
            if let Some(entry) = inner.rooms.get_mut(room).and_then(|m| m.get_mut(identity)) {
                entry.pending = Some(token);
            }
            return Departure::Grace(token);
        }
        Departure::Offline(Self::remove(&mut inner, room, identity))
    }

    /// The grace period `token` is over: the identity goes offline unless a connection came
    /// back meanwhile. Returns its status when it went offline.
    pub fn expire(&self, room: &str, identity: &str, token: u64) -> Option<Option<Arc<str>>> {
        let mut inner = self.lock();
        let entry = inner.rooms.get(room)?.get(identity)?;
        if entry.present > 0 || entry.pending != Some(token) {
            return None;
        }
        Some(Self::remove(&mut inner, room, identity))
    }

    fn remove(inner: &mut Inner, room: &str, identity: &str) -> Option<Arc<str>> {
        if let Some(members) = inner.rooms.get_mut(room) {
            members.remove(identity);
            if members.is_empty() {
                inner.rooms.remove(room);
            }
        }
        let id = inner.identities.get_mut(identity)?;
        id.0 -= 1;
        let status = id.1.clone();
        if id.0 == 0 {
            inner.identities.remove(identity);
        }
        status
    }

    /// Sets the status of an online identity. Returns the rooms it is online in (to tell), or
    /// `None` when it is online nowhere.
    pub fn set_status(&self, identity: &str, status: Option<Arc<str>>) -> Option<Vec<Arc<str>>> {
        let mut inner = self.lock();
        inner.identities.get_mut(identity)?.1 = status;
        Some(
            inner
                .rooms
                .iter()
                .filter(|(_, members)| members.contains_key(identity))
                .map(|(room, _)| room.clone())
                .collect(),
        )
    }

    /// Who is online in `room`, sorted by identity.
    pub fn list(&self, room: &str) -> Vec<Online> {
        let inner = self.lock();
        let mut list: Vec<Online> = inner.rooms.get(room).map_or_else(Vec::new, |members| {
            members
                .iter()
                .map(|(identity, entry)| Online {
                    identity: identity.clone(),
                    status: inner.identities.get(identity).and_then(|i| i.1.clone()),
                    connections: entry.present,
                })
                .collect()
        });
        list.sort_by(|a, b| a.identity.cmp(&b.identity));
        list
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn online_from_the_first_connection_until_the_last_leaves() {
        let p = Presence::default();
        let ada: Arc<str> = "ada".into();
        assert_eq!(p.arrive("r", &ada), Some(None));
        assert_eq!(p.arrive("r", &ada), None);
        assert_eq!(p.list("r")[0].connections, 2);
        assert_eq!(p.depart("r", "ada", false), Departure::Stays);
        assert_eq!(p.depart("r", "ada", false), Departure::Offline(None));
        assert!(p.list("r").is_empty());
    }

    #[test]
    fn a_return_inside_the_grace_period_is_no_change() {
        let p = Presence::default();
        let ada: Arc<str> = "ada".into();
        p.arrive("r", &ada);
        let Departure::Grace(token) = p.depart("r", "ada", true) else {
            panic!("no grace period");
        };
        // Still listed while the grace period runs.
        assert_eq!(p.list("r").len(), 1);
        assert_eq!(p.arrive("r", &ada), None);
        assert_eq!(p.expire("r", "ada", token), None);
        // A second drop starts a new grace period; the old token is void.
        let Departure::Grace(again) = p.depart("r", "ada", true) else {
            panic!("no grace period");
        };
        assert_eq!(p.expire("r", "ada", token), None);
        assert_eq!(p.expire("r", "ada", again), Some(None));
        assert!(p.list("r").is_empty());
    }

    #[test]
    fn statuses_belong_to_online_identities() {
        let p = Presence::default();
        let ada: Arc<str> = "ada".into();
        assert_eq!(p.set_status("ada", Some("away".into())), None);
        p.arrive("r1", &ada);
        p.arrive("r2", &ada);
        let mut rooms = p.set_status("ada", Some("away".into())).unwrap();
        rooms.sort();
        assert_eq!(rooms, [Arc::from("r1"), Arc::from("r2")]);
        assert_eq!(p.list("r1")[0].status.as_deref(), Some("away"));
        assert_eq!(
            p.depart("r1", "ada", false),
            Departure::Offline(Some("away".into()))
        );
        assert_eq!(
            p.depart("r2", "ada", false),
            Departure::Offline(Some("away".into()))
        );
        // Offline everywhere: the status is gone with it.
        p.arrive("r1", &ada);
        assert_eq!(p.list("r1")[0].status, None);
    }
}
