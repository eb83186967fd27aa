//! Plugin code and calls into it: a loaded plugin version is either a WASM component
//! ([`wasm`]) or a handler compiled into the host ([`builtin`]). A call takes a message and
//! returns the effects it recorded; it never touches sockets, rooms or the store itself.

pub mod builtin;
pub mod epoch;
pub mod stdio;
pub mod wasm;

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::effects::{Effect, LogLevel};
use crate::error::CallError;
use crate::manifest::{Capabilities, Limits, Manifest};
use crate::requests::Requests;
use crate::rooms::Rooms;
use crate::session::Sessions;
use crate::timers::Timers;

/// One message handed to a plugin.
#[derive(Debug, Clone, Copy)]
pub struct CallInput<'a> {
    pub handler: &'a str,
    pub ty: &'a str,
    pub room: Option<&'a str>,
    /// JSON text.
    pub payload: &'a str,
    /// The origin's identity.
    pub sender: &'a str,
    pub connection_id: &'a str,
    pub message_id: Option<&'a str>,
    /// JSON text of an object.
    pub metadata: Option<&'a str>,
}

/// What a call produced.
#[derive(Debug)]
pub struct CallOutput {
    /// The effects recorded, to apply only if `result` is `Ok`.
    pub effects: Vec<Effect>,
    /// Log lines, emitted whether or not the call succeeded.
    pub logs: Vec<(LogLevel, String)>,
    /// The keys of the plugin's store the call read, with the versions it saw: its writes
    /// commit only if none of them changed since (see [`crate::kv`]).
    pub reads: crate::kv::Reads,
    /// The handler's result: JSON text of an object to merge into the ack, or why it failed.
    pub result: Result<Option<String>, CallError>,
}

impl CallOutput {
    /// A call that failed before recording anything.
    pub fn failed(err: CallError) -> CallOutput {
        CallOutput {
            effects: Vec::new(),
            logs: Vec::new(),
            reads: Vec::new(),
            result: Err(err),
        }
    }

    /// A call that succeeded with one effect and no ack value (its list from
    /// [`effects::list`](crate::effects::list), as a WASM call's).
    pub fn effect(effect: Effect) -> CallOutput {
        let mut effects = crate::effects::list();
        effects.push(effect);
        CallOutput {
            effects,
            logs: Vec::new(),
            reads: Vec::new(),
            result: Ok(None),
        }
    }
}

/// A plugin's key-value store; shared by all versions of the plugin.
pub type KvStore = Arc<crate::kv::KvStore>;

/// What every call of a plugin version may read.
#[derive(Debug)]
pub struct PluginEnv {
    pub id: String,
    pub capabilities: Capabilities,
    pub limits: Limits,
    pub config: BTreeMap<String, String>,
    pub kv: KvStore,
    pub rooms: Arc<Rooms>,
    /// The host's timers (a call reads how many the plugin has pending).
    pub timers: Arc<Timers>,
    /// The host's pending requests (a call reads how many the plugin has).
    pub requests: Arc<Requests>,
    /// The host's sessions (a call of a plugin granted `identity` reads their claims).
    pub sessions: Arc<Sessions>,
}

impl PluginEnv {
    /// The environment of a plugin of its own (timers, requests and sessions of its own too;
    /// see [`PluginEnv::with_host`]).
    pub fn new(manifest: &Manifest, kv: KvStore, rooms: Arc<Rooms>) -> PluginEnv {
        PluginEnv {
            id: manifest.id.clone(),
            capabilities: manifest.capabilities.clone(),
            limits: manifest.limits,
            config: manifest.config.clone(),
            kv,
            rooms,
            timers: Default::default(),
            requests: Default::default(),
            sessions: Default::default(),
        }
    }

    /// Shares the host's timers, requests and sessions.
    pub fn with_host(
        mut self,
        timers: Arc<Timers>,
        requests: Arc<Requests>,
        sessions: Arc<Sessions>,
    ) -> PluginEnv {
        self.timers = timers;
        self.requests = requests;
        self.sessions = sessions;
        self
    }
}

/// The code of one plugin version.
pub enum Code {
    Wasm(wasm::WasmPlugin),
    Builtin(builtin::BuiltinPlugin),
}

impl std::fmt::Debug for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Code::Wasm(_) => f.write_str("Code::Wasm"),
            Code::Builtin(b) => write!(f, "Code::Builtin({b:?})"),
        }
    }
}

impl Code {
    /// The handler names; routes are checked against them at load.
    pub fn handler_names(&self) -> Vec<&str> {
        match self {
            Code::Wasm(p) => p.handlers().iter().map(String::as_str).collect(),
            Code::Builtin(b) => b.handlers().to_vec(),
        }
    }

    /// The `plexus:plugin` interface version a component was built against (`None` for a
    /// builtin, or a component importing no Plexus interface).
    pub fn interface(&self) -> Option<&str> {
        match self {
            Code::Wasm(p) => p.interface(),
            Code::Builtin(_) => None,
        }
    }

    /// Runs one handler. Effects are returned, not applied.
    pub fn call(&self, input: &CallInput<'_>) -> CallOutput {
        match self {
            Code::Wasm(p) => p.call(input),
            Code::Builtin(b) => b.call(input),
        }
    }
}
