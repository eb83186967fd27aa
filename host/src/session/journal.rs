//! What lets a session resume on another node of a cluster: every non-volatile frame of its
//! stream, numbered, written where every node can read it. Declared here, implemented by
//! `crate::cluster`. While the journal holds the frames back, a connection writes a frame only
//! once it is saved, so that whatever a client has seen, another node can give it again.

use std::sync::Arc;

use super::Session;
use super::outbox::Outbox;
use crate::protocol::Frame;

/// Where a frame of a session's stream came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source<'a> {
    /// A room's fan-out, at this offset of the room's stream (it can be read back from there).
    Room { room: &'a Arc<str>, offset: u64 },
    /// The session alone (an answer, a reply, a direct send, a host event).
    Own,
}

/// The store of every session's frames.
pub trait Journal: Send + Sync + std::fmt::Debug {
    /// Saves frame `seq` of `session`'s stream. Called in `seq` order, under the outbox's lock:
    /// it only queues. Once saved, the journal marks it with [`Outbox::saved`].
    fn append(
        &self,
        session: &Arc<str>,
        seq: u64,
        frame: &Frame,
        source: Source<'_>,
        outbox: &Outbox,
    );
    /// Whether connections write only saved frames now (false while the store is out of reach:
    /// the node goes on serving its clients, and a resume elsewhere will say what it lost).
    fn holding(&self) -> bool;
    /// A session began on this node (its identity, ids and resume token are saved).
    fn opened(&self, session: &Session);
    /// A session ended: what was saved for it is deleted.
    fn ended(&self, session: &Session);
}
