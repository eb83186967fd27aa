//! Plexus: a WebSocket host whose application logic runs as hot-swappable WebAssembly plugins.
//!
//! Data flows one way: [`server`] accepts sockets (TLS by [`edge`]) and upgrades those
//! [`auth`] admits, [`connection`] reads frames,
//! [`protocol`] decodes them, [`router`] dispatches them (host types itself, the rest through
//! the [`registry`]'s route table to a [`plugin`] call), the call records [`effects`], and the
//! router applies them to [`rooms`] and each [`session`]'s [`session::outbox`]. See
//! ARCHITECTURE.md.

pub mod auth;
pub mod builder;
pub mod cluster;
pub mod config_file;
pub mod connection;
pub mod edge;
pub mod effects;
pub mod error;
pub mod kv;
pub mod lifecycle;
pub mod limits;
pub mod manifest;
pub mod plugin;
pub mod protocol;
pub mod registry;
pub mod requests;
pub mod rooms;
pub mod router;
pub mod serial;
pub mod server;
pub mod session;
pub mod timers;
pub mod watch;

pub use registry::ReloadEvent;
pub use router::HostLimits;
pub use server::{Config, Server, StartError};
pub use watch::WatchMode;
