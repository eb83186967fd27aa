//! Handlers compiled into the host: the native twin of the `echo` plugin, used to measure what
//! the WASM boundary costs and as a reference for plugin behaviour.

use std::sync::Arc;

use super::{CallInput, CallOutput, PluginEnv};
use crate::effects::Effect;
use crate::error::CallError;
use crate::manifest::{Builtin, HostCap};

/// A builtin plugin bound to its manifest's environment.
#[derive(Debug)]
pub struct BuiltinPlugin {
    kind: Builtin,
    env: Arc<PluginEnv>,
}

impl BuiltinPlugin {
    pub fn new(kind: Builtin, env: Arc<PluginEnv>) -> BuiltinPlugin {
        BuiltinPlugin { kind, env }
    }

    /// The handler names of this builtin.
    pub fn handlers(&self) -> &'static [&'static str] {
        match self.kind {
            Builtin::Echo => &["echo", "broadcast"],
        }
    }

    pub fn call(&self, input: &CallInput<'_>) -> CallOutput {
        let refuse = |code: &str, message: String| {
            CallOutput::failed(CallError::Refused {
                code: code.into(),
                message,
            })
        };
        if !self.env.capabilities.host.contains(&HostCap::Messaging) {
            return refuse("forbidden", "capability `messaging` not granted".into());
        }
        match (self.kind, input.handler) {
            (Builtin::Echo, "echo") => CallOutput::effect(Effect::Reply {
                ty: "echo".into(),
                payload: input.payload.into(),
            }),
            (Builtin::Echo, "broadcast") => {
                let Some(room) = input.room else {
                    return refuse("room_required", "broadcast needs a room".into());
                };
                if !self.env.capabilities.allows_room(room) {
                    return refuse("forbidden", format!("room `{room}` not granted"));
                }
                CallOutput::effect(Effect::Broadcast {
                    volatile: false,
                    room: room.into(),
                    ty: "echo.broadcast".into(),
                    payload: input.payload.into(),
                    include_sender: false,
                })
            }
            (_, other) => refuse("unknown_handler", format!("no handler `{other}`")),
        }
    }
}
