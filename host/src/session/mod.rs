//! Sessions: who is on the other end (connection id, session id, identity) and what outlives a
//! connection so that a client can resume: the session's stream of frames ([`outbox`]), its
//! rooms, its retry window ([`dedupe`]) and its resume token. The registry finds a session by
//! connection id (plugins address connections) and by session id (a resume).

pub mod dedupe;
pub mod journal;
pub mod outbox;
pub mod replay;

use std::collections::{BTreeSet, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use dashmap::DashMap;
use subtle::ConstantTimeEq;

use dedupe::Dedupe;
use journal::Journal;
use outbox::{Bounds, Outbox, outbox};

/// Who is on the other end of a connection: a verified token's `sub`, or a guest. Filled by the
/// host ([`crate::auth`]), never taken from the client (except with the development setting
/// [`SessionPolicy::dev_identity`]).
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

/// How sessions, resumes, retries, presence and heartbeats behave (docs/operations.md lists
/// each with its flag).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionPolicy {
    /// What a session's stream holds: the live queue of its connection and the frames kept for
    /// a resume.
    pub bounds: Bounds,
    /// How long a session waits for a resume after its connection dropped.
    pub resume_ttl: Duration,
    /// How many handled `messageId`s a session remembers, and for how long.
    pub dedupe_ids: usize,
    pub dedupe_ttl: Duration,
    /// How long an identity stays online in a room after its last connection there dropped.
    pub presence_grace: Duration,
    /// WebSocket pings: sent after this long without one, answered within `pong_timeout`.
    pub ping_interval: Duration,
    pub pong_timeout: Duration,
    /// How long one write to a socket may take; then the client is closed as a slow consumer.
    pub write_timeout: Duration,
    /// Development only, never authentication: a client chooses its identity with the query
    /// parameter `devIdentity` (so that two connections can share one).
    pub dev_identity: bool,
}

impl Default for SessionPolicy {
    fn default() -> Self {
        SessionPolicy {
            bounds: Bounds::default(),
            resume_ttl: Duration::from_secs(120),
            dedupe_ids: 1024,
            dedupe_ttl: Duration::from_secs(120),
            presence_grace: Duration::from_secs(5),
            ping_interval: Duration::from_secs(25),
            pong_timeout: Duration::from_secs(20),
            write_timeout: Duration::from_secs(10),
            dev_identity: false,
        }
    }
}

/// Where a session is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Life {
    /// A connection drives it.
    Attached,
    /// Its connection dropped; it waits for a resume. `epoch` tells detachments apart.
    Detached { epoch: u64 },
    /// Over: closed by its client, expired, or the host shut down.
    Ended,
}

/// One session: the shared facts about it and what it owns.
#[derive(Debug)]
pub struct Session {
    /// The connection id plugins see. A resumed session keeps it: it names the session's
    /// logical connection, whichever socket carries it.
    pub connection_id: Arc<str>,
    pub session_id: Arc<str>,
    pub identity: Identity,
    resume_token: Box<str>,
    pub outbox: Outbox,
    rooms: Mutex<BTreeSet<Arc<str>>>,
    dedupe: Mutex<Dedupe>,
    /// Held by the connection task driving the session: one at a time, so that a connection
    /// taking the session over waits for the old one's message in hand.
    driver: Arc<tokio::sync::Mutex<()>>,
    /// Woken when a connection attaches: a resume waiting to take the session over asks the
    /// new one to close too (the last resume wins).
    attached: tokio::sync::Notify,
    life: Mutex<(Life, u64)>,
    /// The verified claims of the token its connection was admitted with (`None`: a guest or a
    /// development identity); replaced by `sys.refresh` and by a resume.
    claims: Mutex<Option<Arc<crate::auth::Claims>>>,
    /// The claims' `valid_until` (Unix seconds; 0: none), read by the connection task after
    /// each frame without a lock.
    valid_until: AtomicU64,
}

/// The right to drive a session, held by its connection task.
pub type Driver = tokio::sync::OwnedMutexGuard<()>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here leaves its data consistent, even if it panicked.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Session {
    /// The secret a client presents to resume this session.
    pub fn resume_token(&self) -> &str {
        &self.resume_token
    }

    /// Whether `token` is this session's resume token, compared in constant time.
    pub fn token_matches(&self, token: &str) -> bool {
        self.resume_token.as_bytes().ct_eq(token.as_bytes()).into()
    }

    /// The verified claims of its connection's token, if it was admitted with one.
    pub fn claims(&self) -> Option<Arc<crate::auth::Claims>> {
        lock(&self.claims).clone()
    }

    /// Replaces the verified claims (admission, `sys.refresh`, resume).
    pub fn set_claims(&self, claims: Option<Arc<crate::auth::Claims>>) {
        let mut held = lock(&self.claims);
        self.valid_until.store(
            claims.as_ref().map_or(0, |c| c.valid_until),
            Ordering::Release,
        );
        *held = claims;
    }

    /// Until when (Unix seconds) its claims let a connection stay open; `None` without claims.
    pub fn valid_until(&self) -> Option<u64> {
        Some(self.valid_until.load(Ordering::Acquire)).filter(|t| *t != 0)
    }

    /// The rooms this session is a member of.
    pub fn rooms(&self) -> Vec<Arc<str>> {
        lock(&self.rooms).iter().cloned().collect()
    }

    pub fn in_room(&self, room: &str) -> bool {
        lock(&self.rooms).contains(room)
    }

    /// How many rooms this session is a member of.
    pub fn room_count(&self) -> usize {
        lock(&self.rooms).len()
    }

    /// Records a membership; false when it was recorded already.
    pub fn add_room(&self, room: Arc<str>) -> bool {
        lock(&self.rooms).insert(room)
    }

    /// Forgets a membership; false when there was none.
    pub fn remove_room(&self, room: &str) -> bool {
        lock(&self.rooms).remove(room)
    }

    /// The retry window.
    pub fn dedupe(&self) -> MutexGuard<'_, Dedupe> {
        lock(&self.dedupe)
    }

    /// The right to drive this session, if no connection holds it.
    pub fn try_drive(&self) -> Option<Driver> {
        self.driver.clone().try_lock_owned().ok()
    }

    /// Takes the session over: asks the connection driving it, if any, to close with
    /// `reason` once it has finished the message in hand, and returns the right to drive it once
    /// that connection let go. A connection that attaches meanwhile (another resume) is asked
    /// too.
    pub async fn take_over(&self, reason: crate::error::CloseReason) -> Driver {
        loop {
            let attached = self.attached.notified();
            tokio::pin!(attached);
            attached.as_mut().enable();
            self.outbox.close(reason);
            tokio::select! {
                driver = self.driver.clone().lock_owned() => return driver,
                () = attached => {}
            }
        }
    }

    /// Marks the session driven by a connection again; false when it has ended.
    pub fn mark_attached(&self) -> bool {
        let mut life = lock(&self.life);
        if life.0 == Life::Ended {
            return false;
        }
        life.0 = Life::Attached;
        drop(life);
        self.attached.notify_waiters();
        true
    }

    /// Marks the session's connection gone; returns the detachment's epoch, or `None` when
    /// the session has ended.
    pub fn mark_detached(&self) -> Option<u64> {
        let mut life = lock(&self.life);
        if life.0 == Life::Ended {
            return None;
        }
        life.1 += 1;
        let epoch = life.1;
        life.0 = Life::Detached { epoch };
        Some(epoch)
    }

    /// Whether the session is still detached since the detachment `epoch`.
    pub fn detached_since(&self, epoch: u64) -> bool {
        lock(&self.life).0 == Life::Detached { epoch }
    }

    /// Whether a connection is attached.
    pub fn is_attached(&self) -> bool {
        lock(&self.life).0 == Life::Attached
    }

    /// Whether the session has ended.
    pub fn is_ended(&self) -> bool {
        lock(&self.life).0 == Life::Ended
    }

    /// Ends the session; true the first time only.
    pub fn mark_ended(&self) -> bool {
        let mut life = lock(&self.life);
        let first = life.0 != Life::Ended;
        life.0 = Life::Ended;
        first
    }
}

/// The node a connection id names (`c-<node>-<random>`).
pub fn node_of(connection_id: &str) -> Option<&str> {
    let rest = connection_id.strip_prefix("c-")?;
    let (node, _) = rest.split_once('-')?;
    Some(node)
}

/// What a session is made of when it is registered.
#[derive(Debug)]
pub struct Opened<'a> {
    pub connection_id: Arc<str>,
    pub session_id: Arc<str>,
    pub identity: Identity,
    pub resume_token: Box<str>,
    pub outbox: Outbox,
    pub policy: &'a SessionPolicy,
}

/// Why a session could not be found for a resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    /// This host never had it, or it ended by its client's close.
    Unknown,
    /// It waited for a resume longer than the resume TTL.
    Expired,
}

/// How many expired session ids are remembered (to answer `expired` rather than
/// `unknown_session`).
const EXPIRED_MEMORY: usize = 65_536;

/// What carries a frame to a connection on another node of a cluster (implemented by
/// `crate::cluster`).
pub trait Relay: Send + Sync + std::fmt::Debug {
    /// Sends `frame` to the connection `connection_id` of node `node`.
    fn send(&self, node: &str, connection_id: &str, frame: &crate::protocol::Frame);
}

/// Where [`Sessions::deliver`] put a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Into the outbox of a session of this node.
    Local,
    /// To the node the connection belongs to.
    Relayed,
    /// Nowhere: no such connection.
    Gone,
}

/// A fresh node id: 32 random bits in hex, new at every start, so that the ids a node hands out
/// (connection ids carry it) never collide with those of another node or an earlier run.
pub fn random_node_id() -> Arc<str> {
    format!("{:08x}", rand::random::<u32>()).into()
}

/// All sessions of this host, by connection id and by session id.
#[derive(Debug)]
pub struct Sessions {
    /// This node's id, the first part of every connection id it hands out.
    node: Arc<str>,
    by_connection: DashMap<Arc<str>, Arc<Session>>,
    by_session: DashMap<Arc<str>, Arc<Session>>,
    expired: Mutex<Expired>,
    relay: OnceLock<Arc<dyn Relay>>,
    /// Where sessions' frames are saved so that they can resume on another node (a cluster).
    journal: OnceLock<Arc<dyn Journal>>,
}

impl Default for Sessions {
    fn default() -> Self {
        Sessions::new(random_node_id())
    }
}

/// The ids of sessions that expired lately, oldest first.
#[derive(Debug, Default)]
struct Expired {
    order: VecDeque<Arc<str>>,
    ids: HashSet<Arc<str>>,
}

impl Sessions {
    /// No sessions yet, on the node `node`.
    pub fn new(node: Arc<str>) -> Sessions {
        Sessions {
            node,
            by_connection: DashMap::new(),
            by_session: DashMap::new(),
            expired: Mutex::default(),
            relay: OnceLock::new(),
            journal: OnceLock::new(),
        }
    }

    /// Saves every session's frames to `journal` from now on (once, before the first session).
    pub fn set_journal(&self, journal: Arc<dyn Journal>) {
        if self.journal.set(journal).is_err() {
            tracing::error!("a second session journal was refused");
        }
    }

    /// The journal sessions are saved to, in a cluster.
    pub fn journal(&self) -> Option<&Arc<dyn Journal>> {
        self.journal.get()
    }

    /// This node's id.
    pub fn node(&self) -> &Arc<str> {
        &self.node
    }

    /// Connects the sessions to the other nodes of a cluster (once).
    pub fn set_relay(&self, relay: Arc<dyn Relay>) {
        if self.relay.set(relay).is_err() {
            tracing::error!("a second relay was refused");
        }
    }

    /// Queues `frame` for the connection `connection_id`, on this node or, in a cluster, on the
    /// node its id names.
    pub fn deliver(&self, connection_id: &str, frame: crate::protocol::Frame) -> Delivery {
        if let Some(session) = self.get(connection_id) {
            return if session.outbox.push(frame) {
                Delivery::Local
            } else {
                Delivery::Gone
            };
        }
        // In a cluster, a connection of this node that is not here may have moved to another.
        match (self.relay.get(), node_of(connection_id)) {
            (Some(relay), Some(node)) => {
                relay.send(node, connection_id, &frame);
                Delivery::Relayed
            }
            _ => Delivery::Gone,
        }
    }

    /// Registers a new session with a fresh connection id, session id and resume token.
    pub fn open(&self, identity: Identity, policy: &SessionPolicy) -> Arc<Session> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let token: [u8; 32] = rand::random();
        let session_id: Arc<str> = format!("s-{}", &id[16..]).into();
        let stream = match self.journal.get() {
            Some(journal) => outbox::journaled(policy.bounds, journal.clone(), session_id.clone()),
            None => outbox(policy.bounds),
        };
        let session = self.register(Opened {
            connection_id: format!("c-{}-{}", self.node, &id[..16]).into(),
            session_id,
            identity,
            resume_token: token.iter().map(|b| format!("{b:02x}")).collect(),
            outbox: stream,
            policy,
        });
        if let Some(journal) = self.journal.get() {
            journal.opened(&session);
        }
        session
    }

    /// Registers a session that moved here from another node (its ids, identity and resume
    /// token kept), with its stream as [`outbox::moved`] made it.
    pub fn adopt(&self, opened: Opened<'_>) -> Arc<Session> {
        self.register(opened)
    }

    fn register(&self, opened: Opened<'_>) -> Arc<Session> {
        let session = Arc::new(Session {
            connection_id: opened.connection_id,
            session_id: opened.session_id,
            identity: opened.identity,
            resume_token: opened.resume_token,
            outbox: opened.outbox,
            rooms: Mutex::default(),
            dedupe: Mutex::new(Dedupe::new(
                opened.policy.dedupe_ids,
                opened.policy.dedupe_ttl,
            )),
            driver: Arc::default(),
            attached: tokio::sync::Notify::new(),
            life: Mutex::new((Life::Attached, 0)),
            claims: Mutex::default(),
            valid_until: AtomicU64::new(0),
        });
        self.by_connection
            .insert(session.connection_id.clone(), session.clone());
        self.by_session
            .insert(session.session_id.clone(), session.clone());
        session
    }

    /// Forgets a session (it has ended); `expired` when it ended waiting for a resume.
    pub fn remove(&self, session: &Session, expired: bool) {
        if let Some(journal) = self.journal.get() {
            journal.ended(session);
        }
        self.by_connection.remove(&session.connection_id);
        self.by_session.remove(&session.session_id);
        if expired {
            let mut list = lock(&self.expired);
            if list.order.len() >= EXPIRED_MEMORY
                && let Some(old) = list.order.pop_front()
            {
                list.ids.remove(&old);
            }
            list.order.push_back(session.session_id.clone());
            list.ids.insert(session.session_id.clone());
        }
    }

    /// Forgets a session that moved to another node (what is saved of it stays).
    pub fn forget(&self, session: &Session) {
        self.by_connection.remove(&session.connection_id);
        self.by_session.remove(&session.session_id);
    }

    /// The session of a connection id, if it is on this host.
    pub fn get(&self, connection_id: &str) -> Option<Arc<Session>> {
        self.by_connection.get(connection_id).map(|s| s.clone())
    }

    /// The session with this session id, for a resume.
    pub fn find(&self, session_id: &str) -> Result<Arc<Session>, Missing> {
        if let Some(s) = self.by_session.get(session_id) {
            return Ok(s.clone());
        }
        if lock(&self.expired).ids.contains(session_id) {
            return Err(Missing::Expired);
        }
        Err(Missing::Unknown)
    }

    /// Asks every attached connection to close once its queued frames are written.
    pub fn close_all(&self, reason: crate::error::CloseReason) {
        for session in self.by_session.iter() {
            session.outbox.close(reason);
        }
    }

    /// Every session, attached or waiting for a resume.
    pub fn all(&self) -> Vec<Arc<Session>> {
        self.by_session.iter().map(|s| s.clone()).collect()
    }

    /// How many sessions exist (attached or waiting for a resume).
    pub fn len(&self) -> usize {
        self.by_session.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_session.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_identities_carry_128_random_bits() {
        let a = Identity::guest();
        let hex = a.0.strip_prefix("guest-").expect("the guest- prefix");
        assert_eq!(hex.len(), 32, "{a:?}");
        assert!(u128::from_str_radix(hex, 16).is_ok(), "{a:?}");
        assert_ne!(a, Identity::guest());
    }

    #[test]
    fn sessions_are_found_by_both_ids_and_expired_ones_are_told_apart() {
        let sessions = Sessions::default();
        let policy = SessionPolicy::default();
        let s = sessions.open(Identity::guest(), &policy);
        assert!(sessions.get(&s.connection_id).is_some());
        assert!(sessions.find(&s.session_id).is_ok());
        assert!(s.token_matches(s.resume_token()));
        assert!(!s.token_matches("nope"));
        assert_eq!(s.resume_token().len(), 64);
        sessions.remove(&s, true);
        assert_eq!(sessions.find(&s.session_id).unwrap_err(), Missing::Expired);
        assert_eq!(sessions.find("s-other").unwrap_err(), Missing::Unknown);
        assert!(sessions.get(&s.connection_id).is_none());
    }

    #[test]
    fn life_epochs_tell_detachments_apart() {
        let s = Sessions::default().open(Identity::guest(), &SessionPolicy::default());
        let first = s.mark_detached().unwrap();
        assert!(s.detached_since(first));
        assert!(s.mark_attached());
        assert!(!s.detached_since(first));
        let second = s.mark_detached().unwrap();
        assert_ne!(first, second);
        assert!(s.mark_ended());
        assert!(!s.mark_ended());
        assert!(!s.mark_attached());
        assert_eq!(s.mark_detached(), None);
    }
}
