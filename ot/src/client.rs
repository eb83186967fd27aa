//! The client side of the editor protocol: the local copy of a document and the three-state
//! machine (synchronized / awaiting ack / awaiting with buffer) that keeps at most one
//! operation in flight and transforms the server's operations against the pending ones.

use crate::operation::{OpError, Operation};

/// Where the client stands with the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Nothing sent is unacknowledged.
    Synchronized,
    /// One operation is in flight, waiting for its ack.
    AwaitingAck(Operation),
    /// One operation in flight, and local edits made since, composed into one buffer that is
    /// sent when the ack comes.
    AwaitingWithBuffer(Operation, Operation),
}

/// An operation to send to the server as `doc.op` `{"revision", "op"}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// The server revision the operation applies to.
    pub revision: u64,
    /// The operation.
    pub op: Operation,
}

/// What the client cannot do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// A local or server operation does not fit the local document.
    #[error(transparent)]
    Op(#[from] OpError),
    /// An ack arrived with nothing in flight.
    #[error("an ack arrived while no operation was in flight")]
    UnexpectedAck,
    /// A server operation did not follow the last revision seen.
    #[error("expected revision {expected} from the server, got {got}")]
    OutOfOrder { expected: u64, got: u64 },
}

/// The client's copy of one document.
#[derive(Debug, Clone)]
pub struct Client {
    text: String,
    revision: u64,
    state: State,
}

impl Client {
    /// A client that has just opened the document at `revision` (the `doc.open` snapshot).
    pub fn new(text: impl Into<String>, revision: u64) -> Client {
        Client {
            text: text.into(),
            revision,
            state: State::Synchronized,
        }
    }

    /// The local text, with the pending edits applied.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The last server revision the client has seen (acked or received).
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The state machine's state.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Whether every local edit has been acknowledged.
    pub fn is_synchronized(&self) -> bool {
        self.state == State::Synchronized
    }

    /// Applies a local edit to the local text. Returns the operation to send now, if the
    /// client was synchronized; otherwise the edit waits in the buffer.
    pub fn apply_local(&mut self, op: Operation) -> Result<Option<Outgoing>, ClientError> {
        self.text = op.apply(&self.text)?;
        let (state, send) = match std::mem::replace(&mut self.state, State::Synchronized) {
            State::Synchronized => (State::AwaitingAck(op.clone()), Some(op)),
            State::AwaitingAck(inflight) => (State::AwaitingWithBuffer(inflight, op), None),
            State::AwaitingWithBuffer(inflight, buffer) => match buffer.compose(&op) {
                Ok(buffer) => (State::AwaitingWithBuffer(inflight, buffer), None),
                Err(e) => {
                    self.state = State::AwaitingWithBuffer(inflight, buffer);
                    return Err(e.into());
                }
            },
        };
        self.state = state;
        Ok(send.map(|op| Outgoing {
            revision: self.revision,
            op,
        }))
    }

    /// The server acknowledged the operation in flight as `revision`. Returns the buffered
    /// edits to send next, if any.
    pub fn server_ack(&mut self, revision: u64) -> Result<Option<Outgoing>, ClientError> {
        match std::mem::replace(&mut self.state, State::Synchronized) {
            State::Synchronized => Err(ClientError::UnexpectedAck),
            State::AwaitingAck(_) => {
                self.revision = revision;
                Ok(None)
            }
            State::AwaitingWithBuffer(_, buffer) => {
                self.revision = revision;
                self.state = State::AwaitingAck(buffer.clone());
                Ok(Some(Outgoing {
                    revision,
                    op: buffer,
                }))
            }
        }
    }

    /// Another client's operation, applied by the server as `revision` (`doc.applied`).
    /// Transforms it against the pending edits, applies it to the local text and returns the
    /// operation applied locally (what an editor view must apply).
    pub fn apply_server(
        &mut self,
        revision: u64,
        op: &Operation,
    ) -> Result<Operation, ClientError> {
        if revision != self.revision + 1 {
            return Err(ClientError::OutOfOrder {
                expected: self.revision + 1,
                got: revision,
            });
        }
        let (state, local) = match &self.state {
            State::Synchronized => (State::Synchronized, op.clone()),
            State::AwaitingAck(inflight) => {
                let (inflight, op) = Operation::transform(inflight, op)?;
                (State::AwaitingAck(inflight), op)
            }
            State::AwaitingWithBuffer(inflight, buffer) => {
                let (inflight, op) = Operation::transform(inflight, op)?;
                let (buffer, op) = Operation::transform(buffer, &op)?;
                (State::AwaitingWithBuffer(inflight, buffer), op)
            }
        };
        self.text = local.apply(&self.text)?;
        self.state = state;
        self.revision = revision;
        Ok(local)
    }

    /// Starts over from a fresh snapshot (after `resync_required`). Returns the local edits
    /// that were not acknowledged, composed, against the text the client had before them; they
    /// are lost to the server and the caller decides what to do with them.
    pub fn resync(&mut self, text: impl Into<String>, revision: u64) -> Option<Operation> {
        let lost = match std::mem::replace(&mut self.state, State::Synchronized) {
            State::Synchronized => None,
            State::AwaitingAck(inflight) => Some(inflight),
            State::AwaitingWithBuffer(inflight, buffer) => inflight.compose(&buffer).ok(),
        };
        self.text = text.into();
        self.revision = revision;
        lost
    }

    /// Maps a position in the server's document at [`revision`](Self::revision) (a remote
    /// cursor from `doc.cursor`) to the local text, past the pending edits.
    pub fn transform_index(&self, index: usize) -> usize {
        match &self.state {
            State::Synchronized => index,
            State::AwaitingAck(inflight) => inflight.transform_index(index),
            State::AwaitingWithBuffer(inflight, buffer) => {
                buffer.transform_index(inflight.transform_index(index))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(json: &str) -> Operation {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn walks_through_the_three_states() {
        let mut c = Client::new("abc", 7);
        let sent = c.apply_local(op(r#"[3, "d"]"#)).unwrap().unwrap();
        assert_eq!(
            (sent.revision, sent.op.to_string()),
            (7, r#"[3,"d"]"#.into())
        );
        assert!(c.apply_local(op(r#"[4, "e"]"#)).unwrap().is_none());
        assert!(c.apply_local(op(r#"[5, "f"]"#)).unwrap().is_none());
        assert_eq!(c.text(), "abcdef");
        // Someone else prepended "X" as revision 8.
        let local = c.apply_server(8, &op(r#"["X", 3]"#)).unwrap();
        assert_eq!(local.to_string(), r#"["X",6]"#);
        assert_eq!(c.text(), "Xabcdef");
        // Our "d" became revision 9; the buffer goes out against it.
        let next = c.server_ack(9).unwrap().unwrap();
        assert_eq!(
            (next.revision, next.op.to_string()),
            (9, r#"[5,"ef"]"#.into())
        );
        assert_eq!(c.server_ack(10).unwrap(), None);
        assert!(c.is_synchronized());
        assert_eq!(c.server_ack(11), Err(ClientError::UnexpectedAck));
        assert!(matches!(
            c.apply_server(12, &op("[7]")),
            Err(ClientError::OutOfOrder { .. })
        ));
    }
}
