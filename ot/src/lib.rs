//! Plain-text operational transformation for the Plexus editor: operations made of `retain n`,
//! `insert "s"` and `delete n`, counted in Unicode scalar values (Rust `char`s, not bytes and
//! not UTF-16 units), with `apply`, `compose`, `transform` and `invert`, and the client state
//! machine (synchronized / awaiting ack / awaiting with buffer) of the editor protocol
//! (`docs/editor.md`).
//!
//! ```
//! use plexus_ot::Operation;
//!
//! let doc = "héllo";
//! let mut a = Operation::new();
//! a.retain(5).insert(" wörld"); // appended by one client
//! let mut b = Operation::new();
//! b.delete(1).insert("H").retain(4); // capitalized by another, concurrently
//! let (a2, b2) = Operation::transform(&a, &b).unwrap();
//! let left = b2.apply(&a.apply(doc).unwrap()).unwrap();
//! let right = a2.apply(&b.apply(doc).unwrap()).unwrap();
//! assert_eq!(left, right);
//! assert_eq!(left, "Héllo wörld");
//! ```
//!
//! The wire form of an operation (serde) is the compact JSON array browsers' OT libraries use:
//! a positive integer retains, a string inserts, a negative integer deletes
//! (`[5, " wörld"]`, `[-1, "H", 4]`).

mod client;
mod operation;

pub use client::{Client, ClientError, Outgoing, State};
pub use operation::{Component, OpError, Operation};
