//! Sessions: who a connection is (connection id, session id, identity) and the registry that
//! finds a session's outbox by connection id.

use std::sync::Arc;

use dashmap::DashMap;

pub mod outbox;

use outbox::{Outbox, OutboxRx, outbox};

/// Who is on the other end of a connection. Filled by the host (later: by the auth layer),
/// never taken from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity(pub Arc<str>);

impl Identity {
    /// An anonymous guest identity: 128 random bits, so that two guests never share one (with
    /// 32 bits, two of a few tens of thousands of guests would).
    pub fn guest() -> Identity {
        let bits: u128 = rand::random();
        Identity(format!("guest-{bits:032x}").into())
    }
}

/// One live session: the shared, read-only facts about a connection plus its outbox.
#[derive(Debug)]
pub struct Session {
    pub connection_id: Arc<str>,
    pub session_id: Arc<str>,
    pub identity: Identity,
    pub outbox: Outbox,
}

/// All sessions of this host, by connection id.
#[derive(Debug, Default)]
pub struct Sessions {
    by_connection: DashMap<Arc<str>, Arc<Session>>,
}

impl Sessions {
    /// Registers a new session with a fresh connection and session id.
    pub fn open(&self, identity: Identity, outbox_capacity: usize) -> (Arc<Session>, OutboxRx) {
        let (tx, rx) = outbox(outbox_capacity);
        let id = uuid::Uuid::new_v4().simple().to_string();
        let session = Arc::new(Session {
            connection_id: format!("c-{}", &id[..16]).into(),
            session_id: format!("s-{}", &id[16..]).into(),
            identity,
            outbox: tx,
        });
        self.by_connection
            .insert(session.connection_id.clone(), session.clone());
        (session, rx)
    }

    /// Forgets a session.
    pub fn close(&self, connection_id: &str) {
        self.by_connection.remove(connection_id);
    }

    /// The session of a connection, if it is on this host.
    pub fn get(&self, connection_id: &str) -> Option<Arc<Session>> {
        self.by_connection.get(connection_id).map(|s| s.clone())
    }

    /// Asks every open session to close once its queued frames are written.
    pub fn close_all(&self, reason: crate::error::CloseReason) {
        for session in self.by_connection.iter() {
            session.outbox.close(reason);
        }
    }

    /// How many sessions are open.
    pub fn len(&self) -> usize {
        self.by_connection.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_connection.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::Identity;

    #[test]
    fn guest_identities_carry_128_random_bits() {
        let a = Identity::guest();
        let hex = a.0.strip_prefix("guest-").expect("the guest- prefix");
        assert_eq!(hex.len(), 32, "{a:?}");
        assert!(u128::from_str_radix(hex, 16).is_ok(), "{a:?}");
        assert_ne!(a, Identity::guest());
    }
}
