//! The router: takes one decoded client frame of a session, handles host types (`sys.*`) itself,
//! routes every other type to a plugin by the current route table, applies the effects the call
//! recorded, and answers with exactly one `sys.ack` or `sys.error` where the protocol asks.

use std::sync::Arc;
use std::time::Instant;

use serde_json::json;

use crate::effects::{self, Effect, LogLevel, RequestTo};
use crate::error::{CloseReason, ErrorCode, HandleError};
use crate::lifecycle::{self, Due};
use crate::limits::{
    Admit, ConnectionLimits, ConnectionRate, Connections, IdentityRates, RateLimit,
};
use crate::manifest::HostEvent;
use crate::plugin::{CallInput, CallOutput};
use crate::protocol::{self, Inbound, Outbound};
use crate::registry::health::Change;
use crate::registry::{BreakerPolicy, LoadedPlugin, Registry, Verdict};
use crate::requests::Targets;
use crate::rooms::presence::{Online, Presence};
use crate::rooms::{MemberInfo, Rooms};
use crate::serial::{RoomLocks, Turn};
use crate::session::outbox::{AttachError, OutboxRx};
use crate::session::{Delivery, Driver, Identity, Missing, Session, SessionPolicy, Sessions};

/// Host-wide limits on connections.
#[derive(Debug, Clone, Copy)]
pub struct HostLimits {
    /// Largest text frame a client may send; larger ones get `too_large`.
    pub max_message_bytes: usize,
    /// Longest room name.
    pub max_room_name: usize,
    /// Deepest nesting and longest array of a client frame's JSON.
    pub json: protocol::JsonLimits,
    /// Rooms one session may be in at once.
    pub max_rooms_per_connection: usize,
    /// Members one room may have.
    pub max_room_members: usize,
    /// Message rate limits per connection and per identity (none: unlimited).
    pub rate: Option<RateLimit>,
    /// The circuit breaker and the slow lane of plugin versions.
    pub breaker: BreakerPolicy,
    /// Connections in all, per IP address and per identity.
    pub connections: ConnectionLimits,
}

impl Default for HostLimits {
    fn default() -> Self {
        HostLimits {
            max_message_bytes: 64 << 10,
            max_room_name: 256,
            json: protocol::JsonLimits::default(),
            max_rooms_per_connection: 100,
            max_room_members: 100_000,
            rate: Some(RateLimit::default()),
            breaker: BreakerPolicy::default(),
            connections: ConnectionLimits::default(),
        }
    }
}

/// The state every connection of a host shares.
#[derive(Debug)]
pub struct Hub {
    /// Every session of the host, shared with the registry (plugin calls read their claims).
    pub sessions: Arc<Sessions>,
    pub rooms: Arc<Rooms>,
    pub registry: Registry,
    pub limits: HostLimits,
    /// Sessions, resumes, retries, presence and heartbeats.
    pub policy: SessionPolicy,
    /// Who is online in each room.
    pub presence: Presence,
    /// The connections counted against `limits.connections`.
    pub connections: Arc<Connections>,
    /// The message rate of every identity (when `limits.rate` is set).
    pub identity_rates: Option<IdentityRates>,
    /// Work due later (ends of grace periods and of resume waits), done by the host's
    /// lifecycle task (`lifecycle::run`).
    pub due: tokio::sync::mpsc::UnboundedSender<Due>,
    /// Turns of room-serialized routes (`serialize = "room"`).
    pub room_locks: RoomLocks,
    /// Token verification (`sys.refresh`).
    pub auth: crate::auth::Auth,
    /// Turns of the `connect` and `disconnect` events of one identity (keyed by identity), so
    /// that a plugin keeping an identity's connections in its store sees them one at a time.
    pub identity_turns: RoomLocks,
    /// This node's part in a cluster, when it is one of several.
    pub cluster: std::sync::OnceLock<Arc<crate::cluster::Cluster>>,
}

impl Hub {
    /// A hub with no session yet. Returns the receiving end of its work due later, for the
    /// lifecycle task (`lifecycle::run`). The identities' rate buckets follow `limits.rate`.
    pub fn new(
        registry: Registry,
        rooms: Arc<Rooms>,
        limits: HostLimits,
        policy: SessionPolicy,
        auth: crate::auth::Auth,
    ) -> (Hub, tokio::sync::mpsc::UnboundedReceiver<Due>) {
        let (due, due_rx) = tokio::sync::mpsc::unbounded_channel();
        let hub = Hub {
            sessions: registry.sessions().clone(),
            rooms,
            registry,
            limits,
            policy,
            presence: Presence::default(),
            connections: Arc::default(),
            identity_rates: limits.rate.map(IdentityRates::new),
            due,
            room_locks: RoomLocks::default(),
            auth,
            identity_turns: Default::default(),
            cluster: std::sync::OnceLock::new(),
        };
        (hub, due_rx)
    }
}

/// What one connection's task owns: the session it drives and that session's live queue.
#[derive(Debug)]
pub struct ConnState {
    pub session: Arc<Session>,
    pub rx: OutboxRx,
    driver: Driver,
    /// Set when a resume moved this connection to another session: the connection task
    /// re-arms its wake-ups on the new session's outbox.
    pub switched: bool,
    /// This connection's message rate (it stays with the connection across a resume).
    rate: Option<ConnectionRate>,
}

impl ConnState {
    /// Opens a new session driven by this connection.
    pub fn open(hub: &Hub, identity: Identity) -> ConnState {
        let session = hub.sessions.open(identity, &hub.policy);
        let driver = session.try_drive().expect("a new session has no driver");
        let (rx, _) = session
            .outbox
            .attach(0)
            .expect("a new session has no connection");
        ConnState {
            session,
            rx,
            driver,
            switched: false,
            rate: hub.limits.rate.map(ConnectionRate::new),
        }
    }

    /// The parts the connection task lets go of, in order, when its socket is done: the live
    /// queue first, then the right to drive the session.
    pub fn into_parts(self) -> (Arc<Session>, OutboxRx, Driver) {
        (self.session, self.rx, self.driver)
    }

    fn push(&self, frame: protocol::Frame) {
        self.session.outbox.push(frame);
    }
}

/// How deep plugin-triggered host events may nest. A client's frame or the host acts at depth
/// 0; a plugin call it causes runs at depth 1, and each join or leave a call makes, and the
/// event calls that fires, one deeper. Events fire below this depth: a route's joins fire
/// them, and so do the joins of the handlers of those events, but not the joins of the
/// handlers of those second events (so plugins joining each other's rooms cannot loop).
const MAX_EVENT_DEPTH: u8 = 4;

/// The longest status a client may set with `sys.status`, in characters.
pub const MAX_STATUS_CHARS: usize = 64;

/// Handles one client text frame: rate limit, decode, dispatch, answer.
pub async fn handle_text(hub: &Hub, conn: &mut ConnState, text: &str) {
    if let (Some(rate), Some(identities)) = (conn.rate.as_mut(), hub.identity_rates.as_ref()) {
        let admit = rate.admit(identities, &conn.session.identity.0);
        if admit != Admit::Yes {
            let id = protocol::salvage_message_id(text);
            conn.push(protocol::error(
                id.as_deref(),
                ErrorCode::RateLimited.as_str(),
                "too many messages: slow down",
            ));
            if admit == Admit::Close {
                conn.session.outbox.close(CloseReason::RateLimited);
            }
            return;
        }
    }
    if text.len() > hub.limits.max_message_bytes {
        let message = format!(
            "frame of {} bytes exceeds the limit of {} bytes",
            text.len(),
            hub.limits.max_message_bytes
        );
        let id = protocol::salvage_message_id(text);
        conn.push(protocol::error(
            id.as_deref(),
            ErrorCode::TooLarge.as_str(),
            &message,
        ));
        return;
    }
    let msg = match protocol::decode(text, hub.limits.json) {
        Ok(msg) => msg,
        Err(e) => {
            conn.push(protocol::error(
                e.message_id.as_deref(),
                e.code.as_str(),
                &e.message,
            ));
            return;
        }
    };
    // A retry of a frame this session handled lately gets the same answer again.
    let dedupe = msg.message_id.as_deref().filter(|_| msg.ty != "sys.resume");
    let now = dedupe.map(|_| Instant::now());
    if let (Some(id), Some(now)) = (dedupe, now)
        && let Some(answer) = conn.session.dedupe().answer(id, now)
    {
        conn.push(answer);
        return;
    }
    // A room-serialized call keeps its turn until its answer is queued too, so that the next
    // call's frames cannot overtake it.
    let mut turn = None;
    let result = dispatch(hub, conn, &msg, &mut turn).await;
    let answer = match (result, msg.message_id.as_deref()) {
        (Ok(extra), Some(id)) => {
            // Encoded with its `seq`: the answer most messages get.
            let ack = conn
                .session
                .outbox
                .push_numbered(|seq| protocol::ack(seq, id, extra.as_deref()));
            if let (Some(ack), Some(id), Some(now)) = (ack, dedupe, now) {
                conn.session.dedupe().record(id, ack, now);
            }
            None
        }
        (Ok(_), None) => None,
        (Err(HandleError::ResumeFailed { reason, message }), id) => {
            Some(protocol::resume_failed(id, reason, &message))
        }
        (Err(e), id) => {
            let (code, message) = e.wire();
            Some(protocol::error(id, code, message))
        }
    };
    if let Some(answer) = answer {
        if let (Some(id), Some(now)) = (dedupe, now) {
            conn.session.dedupe().record(id, answer.clone(), now);
        }
        conn.push(answer);
    }
    drop(turn);
}

/// Answers a frame that is not text.
pub fn handle_binary(conn: &ConnState) {
    conn.push(protocol::error(
        None,
        ErrorCode::BadFrame.as_str(),
        "binary frames are not supported; send JSON text frames",
    ));
}

async fn dispatch<'h>(
    hub: &'h Hub,
    conn: &mut ConnState,
    msg: &Inbound<'_>,
    turn: &mut Option<Turn<'h>>,
) -> Result<Option<String>, HandleError> {
    let session = conn.session.clone();
    match msg.ty.as_ref() {
        "sys.join" => {
            let room = room_of(hub, msg)?;
            let members = Box::pin(join_room(hub, &session, &room, msg.payload.get(), 0)).await?;
            let presence = Box::pin(lifecycle::online(hub, &room)).await;
            Ok(Some(
                json!({
                    "room": room,
                    "members": members_json(&members),
                    "presence": presence_json(&presence),
                })
                .to_string(),
            ))
        }
        "sys.presence" => {
            let room = room_of(hub, msg)?;
            if !session.in_room(&room) {
                return Err(HandleError::new(
                    ErrorCode::NotInRoom,
                    format!("join room `{room}` before asking who is in it"),
                ));
            }
            let presence = Box::pin(lifecycle::online(hub, &room)).await;
            Ok(Some(
                json!({ "room": room, "presence": presence_json(&presence) }).to_string(),
            ))
        }
        "sys.status" => {
            let status = protocol::payload_status(msg.payload)
                .map_err(|m| HandleError::new(ErrorCode::BadFrame, m))?;
            if let Some(status) = &status
                && status.chars().count() > MAX_STATUS_CHARS
            {
                return Err(HandleError::new(
                    ErrorCode::BadFrame,
                    format!("a status is at most {MAX_STATUS_CHARS} characters"),
                ));
            }
            Box::pin(lifecycle::set_status(
                hub,
                &session.identity.0,
                status.map(Arc::from),
            ))
            .await;
            Ok(None)
        }
        "sys.leave" => {
            let room = room_of(hub, msg)?;
            if !Box::pin(leave_room(hub, &session, &room, "leave", 0)).await {
                return Err(HandleError::new(
                    ErrorCode::NotInRoom,
                    format!("not a member of room `{room}`"),
                ));
            }
            Ok(Some(json!({ "room": room }).to_string()))
        }
        "sys.ping" => {
            conn.push(
                Outbound {
                    ty: "sys.pong",
                    room: None,
                    payload: msg.payload.get(),
                    sender: None,
                }
                .encode(),
            );
            Ok(None)
        }
        "sys.resume" => Box::pin(resume(hub, conn, msg)).await,
        "sys.refresh" => crate::auth::handle_refresh(&hub.auth, &session, msg.payload),
        "sys.reply" => {
            let (reference, answer) = protocol::payload_reply(msg.payload)
                .map_err(|m| HandleError::new(ErrorCode::BadFrame, m))?;
            match hub
                .registry
                .requests()
                .reply(&reference, &session.connection_id, answer)
            {
                // A request of another node of the cluster: its answer goes there.
                Err(crate::requests::ReplyError::UnknownRef(_))
                    if match hub.cluster.get() {
                        Some(cluster) => {
                            Box::pin(cluster.forward_reply(
                                &reference,
                                &session.connection_id,
                                answer.get(),
                            ))
                            .await
                        }
                        None => false,
                    } =>
                {
                    Ok(None)
                }
                result => result.map(|()| None).map_err(Into::into),
            }
        }
        "sys.received" => {
            let seq = protocol::payload_seq(msg.payload)
                .map_err(|m| HandleError::new(ErrorCode::BadFrame, m))?;
            session.outbox.trim(seq);
            Ok(None)
        }
        ty if ty.starts_with("sys.") => Err(HandleError::new(
            ErrorCode::UnknownType,
            format!("unknown host message type `{ty}`"),
        )),
        ty => route(hub, &session, ty, msg, turn).await,
    }
}

/// `sys.resume`: hands the session named in the payload to this connection, replays what it
/// missed and ends the fresh session the connection was welcomed with. Never a silent gap: a
/// resume that cannot replay every frame after `lastSeq` fails, changing nothing.
async fn resume(
    hub: &Hub,
    conn: &mut ConnState,
    msg: &Inbound<'_>,
) -> Result<Option<String>, HandleError> {
    let request = protocol::payload_resume(msg.payload)
        .map_err(|m| HandleError::new(ErrorCode::BadFrame, m))?;
    let fail =
        |reason: &'static str, message: String| HandleError::ResumeFailed { reason, message };
    if *conn.session.session_id == *request.session_id {
        return Err(HandleError::new(
            ErrorCode::BadFrame,
            "this connection already drives that session",
        ));
    }
    let found = match (hub.sessions.find(&request.session_id), hub.cluster.get()) {
        // Not on this node: on another one of the cluster, or saved from one that died.
        (Err(Missing::Unknown), Some(cluster)) => {
            let resume = crate::cluster::sessions::Resume {
                session_id: &request.session_id,
                resume_token: &request.resume_token,
                last_seq: request.last_seq,
                authenticated: conn.session.claims().is_some(),
                identity: &conn.session.identity,
            };
            Ok(crate::cluster::sessions::adopt(cluster, hub, resume)
                .await
                .map_err(|r| fail(r.reason, r.message))?)
        }
        (found, _) => found,
    };
    let target = found.map_err(|missing| match missing {
        Missing::Unknown => fail(
            "unknown_session",
            format!("no session `{}` on this host", request.session_id),
        ),
        Missing::Expired => fail(
            "expired",
            format!(
                "session `{}` waited longer than {} s for a resume",
                request.session_id,
                hub.policy.resume_ttl.as_secs()
            ),
        ),
    })?;
    if !target.token_matches(&request.resume_token) {
        return Err(fail("bad_token", "the resume token does not match".into()));
    }
    crate::auth::check_resume(&conn.session, &target)?;
    let gap = |e: AttachError| match e {
        AttachError::Ended => fail(
            "expired",
            format!("session `{}` has ended", request.session_id),
        ),
        other => fail("gap", other.to_string()),
    };
    // Refuse before disturbing anyone: the frames after `lastSeq` must all be kept.
    target.outbox.resumable(request.last_seq).map_err(gap)?;
    // Connection migration: the connection driving it, if any, finishes the message in hand,
    // lets go of the session and closes (4000).
    let driver = target.take_over(CloseReason::TakenOver).await;
    let (rx, replayed) = target.outbox.attach(request.last_seq).map_err(gap)?;
    if !target.mark_attached() {
        return Err(fail(
            "expired",
            format!("session `{}` has ended", request.session_id),
        ));
    }
    let fresh = std::mem::replace(&mut conn.session, target.clone());
    target.set_claims(fresh.claims());
    conn.rx = rx;
    conn.driver = driver;
    conn.switched = true;
    lifecycle::end_session(hub, &fresh, lifecycle::End::Replaced).await;
    lifecycle::attached(hub, &target).await;
    Ok(Some(
        json!({
            "sessionId": &*target.session_id,
            "connectionId": &*target.connection_id,
            "identity": &*target.identity.0,
            "resumed": true,
            "replayed": replayed,
        })
        .to_string(),
    ))
}

fn room_of(hub: &Hub, msg: &Inbound<'_>) -> Result<String, HandleError> {
    let room = msg
        .room
        .as_deref()
        .map(str::to_owned)
        .or_else(|| protocol::payload_room(msg.payload))
        .filter(|r| !r.is_empty())
        .ok_or_else(|| {
            HandleError::new(
                ErrorCode::RoomRequired,
                format!("`{}` needs a room", msg.ty),
            )
        })?;
    if room.len() > hub.limits.max_room_name {
        return Err(HandleError::new(
            ErrorCode::BadFrame,
            format!("room names are at most {} bytes", hub.limits.max_room_name),
        ));
    }
    Ok(room)
}

async fn route<'h>(
    hub: &'h Hub,
    session: &Arc<Session>,
    ty: &str,
    msg: &Inbound<'_>,
    turn: &mut Option<Turn<'h>>,
) -> Result<Option<String>, HandleError> {
    let no_route = || {
        HandleError::new(
            ErrorCode::UnknownType,
            format!("no route for message type `{ty}`"),
        )
    };
    let mut table = hub.registry.table_full();
    let mut target = table.route(ty).ok_or_else(no_route)?;
    if target.serialize.is_some()
        && let Some(room) = msg.room.as_deref()
    {
        *turn = Some(Box::pin(hub.room_locks.turn(&target.plugin.manifest.id, room)).await);
        // The route table of the moment the turn came: calls in turn order also run on
        // versions in swap order.
        table = hub.registry.table_full();
        target = table.route(ty).ok_or_else(no_route)?;
    }
    if let Some(room) = msg.room.as_deref()
        && !target.allow_outside_room
        && !session.in_room(room)
    {
        return Err(HandleError::new(
            ErrorCode::NotInRoom,
            format!("join room `{room}` before sending `{ty}` to it"),
        ));
    }
    let input = CallInput {
        handler: &target.handler,
        ty,
        room: msg.room.as_deref(),
        payload: msg.payload.get(),
        sender: &session.identity.0,
        connection_id: &session.connection_id,
        message_id: msg.message_id.as_deref(),
        metadata: msg.metadata.map(|m| m.get()),
    };
    run_call(hub, Some(session), &target.plugin, &input, 0).await
}

/// How many times a call whose key-value reads conflicted runs before its origin gets
/// `kv_conflict`.
pub const MAX_CALL_ATTEMPTS: u32 = 8;

/// How many more times a call runs again, in a cluster, because another call of this node
/// committed a key it read first (found in this node's replica, without a round trip to Redis).
const MAX_STALE_RUNS: u32 = 64;

/// How long a call waits when an older call of another node holds a key it read, and how many
/// times (the holds last 20 ms).
const HELD_WAIT: std::time::Duration = std::time::Duration::from_millis(1);
const MAX_HELD_WAITS: u32 = 100;

/// Calls a plugin and applies what it recorded. Effects apply only when the call succeeds and
/// every effect is well-formed. `origin` is the session the call acts for (none for calls no
/// client caused).
///
/// The call's key-value writes commit first, and only if no key it read changed since: when
/// one did, everything the call recorded is discarded and it runs again on the same version
/// with the fresh values (up to [`MAX_CALL_ATTEMPTS`] times). Nothing of a discarded attempt
/// is visible to anyone.
pub async fn run_call(
    hub: &Hub,
    origin: Option<&Arc<Session>>,
    plugin: &Arc<LoadedPlugin>,
    input: &CallInput<'_>,
    depth: u8,
) -> Result<Option<String>, HandleError> {
    let mut ticket = crate::kv::Ticket::default();
    let result = run_attempts(hub, origin, plugin, input, depth, &mut ticket).await;
    plugin.kv.finish(ticket);
    result
}

/// The attempts of [`run_call`].
async fn run_attempts(
    hub: &Hub,
    origin: Option<&Arc<Session>>,
    plugin: &Arc<LoadedPlugin>,
    input: &CallInput<'_>,
    depth: u8,
    ticket: &mut crate::kv::Ticket,
) -> Result<Option<String>, HandleError> {
    let mut attempt = 1;
    let mut stale = 0;
    let mut held = 0;
    loop {
        let Checked {
            ack,
            mut effects,
            reads,
        } = call_checked(hub, plugin, input).await?;
        let writes = crate::kv::take_writes(&mut effects);
        // Most calls touch no key: nothing to commit, and no commit future in this one.
        let committed = if reads.is_empty() && writes.is_empty() {
            Ok(())
        } else {
            Box::pin(plugin.kv.commit(reads, writes, ticket)).await
        };
        match committed {
            Ok(()) => {
                apply(hub, origin, plugin, input.room, effects, depth).await;
                return Ok(ack);
            }
            // Another call of this node committed a key this one read first: run again with its
            // outcome at once (each such run follows a commit that succeeded, so calls progress).
            Err(crate::kv::CommitError::Stale) if stale < MAX_STALE_RUNS => {
                effects::recycle(effects);
                stale += 1;
            }
            // An older call of another node holds a key this one read, unchanged: it commits
            // within moments (or its hold ends), then this call runs again.
            Err(crate::kv::CommitError::Held) if held < MAX_HELD_WAITS => {
                effects::recycle(effects);
                held += 1;
                Box::pin(tokio::time::sleep(HELD_WAIT)).await;
            }
            Err(crate::kv::CommitError::Conflict) if attempt < MAX_CALL_ATTEMPTS => {
                effects::recycle(effects);
                attempt += 1;
                tracing::debug!(plugin = %plugin.manifest.id, attempt, "a key the call read changed: the call runs again");
                // A call that now holds what it read (in a cluster) goes again at once.
                if !ticket.holds_all
                    && let Some(wait) = conflict_backoff(attempt)
                {
                    Box::pin(tokio::time::sleep(wait)).await;
                }
            }
            Err(e) => {
                effects::recycle(effects);
                tracing::warn!(plugin = %plugin.manifest.id, attempt, "the call's key-value writes did not commit: {e}");
                return Err(e.into());
            }
        }
    }
}

/// How long a call waits before its attempt number `attempt` after conflicts: the second
/// attempt runs at once (with the fresh values), later ones after a random wait of up to 1, 2,
/// 4, 8, then 16 ms, so that calls contending for one key stop colliding.
fn conflict_backoff(attempt: u32) -> Option<std::time::Duration> {
    let ceiling_us = 1000u64 << attempt.checked_sub(3)?.min(4);
    Some(std::time::Duration::from_micros(
        rand::random::<u64>() % ceiling_us,
    ))
}

/// A successful call whose effects are all well-formed, not applied yet.
struct Checked {
    /// The fields it adds to the ack.
    ack: Option<String>,
    effects: Vec<Effect>,
    /// The keys of the plugin's store it read, with the versions it saw.
    reads: crate::kv::Reads,
}

/// Calls a plugin once, behind its circuit breaker and in its slow lane if it has one, and
/// records the outcome in its health: the ack, the effects and the reads of a successful call
/// whose effects are all well-formed (not applied yet), or the error to answer with.
async fn call_checked(
    hub: &Hub,
    plugin: &Arc<LoadedPlugin>,
    input: &CallInput<'_>,
) -> Result<Checked, HandleError> {
    let breaker = &hub.limits.breaker;
    if let Err(refused) = plugin.health.admit() {
        return Err(HandleError::new(
            ErrorCode::PluginUnavailable,
            format!(
                "plugin `{}` kept failing and is out of service; it is tried again in {} s",
                plugin.manifest.id,
                refused.retry_in.as_secs_f64().ceil()
            ),
        ));
    }
    let output = {
        let _in_flight = plugin.health.begin();
        let started = Instant::now();
        let output = match plugin.health.slow_lane(breaker) {
            None => plugin.code.call(input),
            // A version whose calls run long: one call (by default) at a time, each on a thread
            // of its own, so that the runtime's threads go on serving everyone else.
            Some(lane) => {
                let _permit = Box::pin(lane.acquire()).await;
                off_the_runtime(|| plugin.code.call(input))
            }
        };
        plugin.health.record_duration(started.elapsed(), breaker);
        output
    };
    emit_logs(plugin, &output.logs);
    let checked = check_output(plugin, input, output);
    let failed = matches!(
        &checked,
        Err(HandleError::Host {
            code: ErrorCode::PluginFailed,
            ..
        })
    );
    match plugin.health.record_circuit(failed, breaker) {
        Change::Opened => {
            tracing::warn!(
                plugin = %plugin.manifest.id,
                version = %plugin.version,
                "circuit opened: the version keeps failing; its calls get plugin_unavailable for {:?}",
                breaker.cool_down
            );
            // A new version that keeps failing while on probation goes back to the previous
            // one now, rather than waiting out a cool-down.
            if plugin.health.on_probation() {
                hub.registry.request_rollback(
                    &plugin.manifest.id,
                    &plugin.version,
                    format!("{} calls in a row failed after the swap", breaker.failures),
                );
            }
        }
        Change::Closed => tracing::info!(
            plugin = %plugin.manifest.id,
            version = %plugin.version,
            "circuit closed: the version answered again"
        ),
        Change::None => {}
    }
    if let Verdict::RollBack { calls, failures } =
        plugin.health.record(failed, hub.registry.policy())
    {
        hub.registry.request_rollback(
            &plugin.manifest.id,
            &plugin.version,
            format!("{failures} of its first {calls} calls after the swap failed"),
        );
    }
    checked
}

/// Runs `call` on a thread the runtime can do without (its other tasks move to another worker),
/// or right here on a runtime with one thread.
fn off_the_runtime<T>(call: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(call),
        _ => call(),
    }
}

/// The ack and the effects of a successful call whose effects are all well-formed, or the
/// error to answer with.
fn check_output(
    plugin: &LoadedPlugin,
    input: &CallInput<'_>,
    output: CallOutput,
) -> Result<Checked, HandleError> {
    let ack = match output.result {
        Ok(ack) => ack,
        Err(err) => {
            if !matches!(err, crate::error::CallError::Refused { .. }) {
                tracing::warn!(plugin = %plugin.manifest.id, "plugin call failed: {err}");
            }
            return Err(err.into());
        }
    };
    let bad = |reason: String| {
        HandleError::new(
            ErrorCode::PluginFailed,
            format!(
                "plugin `{}` produced an invalid effect: {reason}",
                plugin.manifest.id
            ),
        )
    };
    for effect in &output.effects {
        // A payload byte-identical to the (already parsed) input payload is valid JSON; anything
        // else is checked before it can reach the wire.
        if let Some(payload) = effect.payload()
            && payload != input.payload
        {
            protocol::validate_json(payload)
                .map_err(|e| bad(format!("payload is not JSON: {e}")))?;
        }
        match effect {
            Effect::Reply { ty, .. } | Effect::Send { ty, .. } | Effect::Broadcast { ty, .. }
                if ty.is_empty() || ty.starts_with("sys.") =>
            {
                return Err(bad(format!("message type `{ty}` is not allowed")));
            }
            // A timer's call or a request's outcome has no connection to reply to or move.
            Effect::Reply { .. } | Effect::Join { .. } | Effect::Leave { .. }
                if input.connection_id.is_empty() =>
            {
                return Err(bad(
                    "a call with no origin connection cannot reply, join or leave".into(),
                ));
            }
            _ => {}
        }
    }
    let ack = match ack {
        None => None,
        Some(text) => ack_fields(&text).map_err(bad)?,
    };
    Ok(Checked {
        ack,
        effects: output.effects,
        reads: output.reads,
    })
}

/// The fields a handler adds to its `sys.ack`, as compact JSON object text, or `None` when
/// there are none. The host builds the ack: `ref` is always the host's, so a `ref` of the
/// plugin's is dropped.
fn ack_fields(text: &str) -> Result<Option<String>, String> {
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Object(mut fields)) => {
            fields.remove("ref");
            Ok((!fields.is_empty()).then(|| serde_json::Value::Object(fields).to_string()))
        }
        _ => Err("the handler's return value must be a JSON object".into()),
    }
}

fn emit_logs(plugin: &LoadedPlugin, logs: &[(LogLevel, String)]) {
    let id = &plugin.manifest.id;
    for (level, line) in logs {
        match level {
            LogLevel::Trace => tracing::trace!(plugin = %id, "{line}"),
            LogLevel::Debug => tracing::debug!(plugin = %id, "{line}"),
            LogLevel::Info => tracing::info!(plugin = %id, "{line}"),
            LogLevel::Warn => tracing::warn!(plugin = %id, "{line}"),
            LogLevel::Error => tracing::error!(plugin = %id, "{line}"),
        }
    }
}

/// Applies a call's effects in the order recorded.
async fn apply(
    hub: &Hub,
    origin: Option<&Arc<Session>>,
    plugin: &LoadedPlugin,
    origin_room: Option<&str>,
    mut effects: Vec<Effect>,
    depth: u8,
) {
    let sender = origin.map(|s| s.identity.0.clone());
    let sender = sender.as_deref();
    let no_origin = |what: &str| {
        tracing::warn!(plugin = %plugin.manifest.id, "{what} in a call with no origin connection: dropped");
    };
    for effect in effects.drain(..) {
        match effect {
            Effect::Reply { ty, payload } => {
                let Some(origin) = origin else {
                    no_origin("a reply");
                    continue;
                };
                let frame = Outbound {
                    ty: &ty,
                    room: origin_room,
                    payload: &payload,
                    sender,
                };
                origin
                    .outbox
                    .push_numbered(|seq| frame.encode_numbered(seq));
            }
            Effect::Send { to, ty, payload } => {
                let frame = Outbound {
                    ty: &ty,
                    room: None,
                    payload: &payload,
                    sender,
                };
                if hub.sessions.deliver(&to, frame.encode()) == Delivery::Gone {
                    tracing::debug!(plugin = %plugin.manifest.id, %to, "send to a connection that is gone");
                }
            }
            Effect::Broadcast {
                room,
                ty,
                payload,
                include_sender,
                volatile,
            } => {
                let frame = Outbound {
                    ty: &ty,
                    room: Some(&room),
                    payload: &payload,
                    sender,
                }
                .encode();
                let except = origin
                    .filter(|_| !include_sender)
                    .map(|s| &*s.connection_id);
                if volatile {
                    hub.rooms
                        .broadcast_volatile(&room, &frame, except, origin.map(|s| &s.outbox));
                } else {
                    hub.rooms
                        .broadcast(&room, &frame, except, origin.map(|s| &s.outbox));
                }
            }
            Effect::Join { room } => match origin {
                Some(origin) => {
                    // Room rules and join hooks apply to a plugin's joins too; a refused join
                    // is not made, and the call's other effects stand.
                    if let Err(e) = Box::pin(join_room(hub, origin, &room, "null", depth + 1)).await
                    {
                        tracing::warn!(plugin = %plugin.manifest.id, %room, "a join refused: {}", e.wire().1);
                    }
                }
                None => no_origin("a join"),
            },
            Effect::Leave { room } => match origin {
                Some(origin) => {
                    Box::pin(leave_room(hub, origin, &room, "leave", depth + 1)).await;
                }
                None => no_origin("a leave"),
            },
            // Committed before the other effects (`run_call`).
            Effect::KvSet { .. } | Effect::KvDelete { .. } => {}
            deferred @ (Effect::Schedule { .. }
            | Effect::CancelTimer { .. }
            | Effect::Request { .. }) => {
                apply_deferred(hub, plugin, origin, deferred);
            }
        }
    }
    effects::recycle(effects);
}

fn members_json(members: &[crate::rooms::MemberInfo]) -> serde_json::Value {
    members
        .iter()
        .map(|m| json!({ "connectionId": &*m.connection_id, "identity": &*m.identity }))
        .collect()
}

/// The `presence` list of a `sys.join` ack or a `sys.presence` answer.
pub fn presence_json(list: &[Online]) -> serde_json::Value {
    list.iter()
        .map(|o| {
            json!({
                "identity": &*o.identity,
                "status": o.status.as_deref(),
                "connections": o.connections,
            })
        })
        .collect()
}

/// Makes the session join a room: tells the other members, counts the identity present, then
/// tells the plugins subscribed to `room.joined`. Returns the member list, or `room_limit` /
/// `room_full`. A session that has ended joins nothing (a `room.left` handler joining a closing
/// connection leaves no ghost).
///
/// Who may join is decided first, for every join (a client's `sys.join` or a plugin's join
/// effect) of a room the session is not in yet: the room rules (`forbidden` naming the rule),
/// then the plugin hooking the room, if one does, called with `payload` (the `sys.join` payload
/// as JSON text; `null` for a plugin's join). A refused join changes nothing.
pub async fn join_room(
    hub: &Hub,
    session: &Arc<Session>,
    room: &str,
    payload: &str,
    depth: u8,
) -> Result<Vec<crate::rooms::MemberInfo>, HandleError> {
    if session.is_ended() {
        return Ok(hub.rooms.members(room));
    }
    if !session.in_room(room) {
        let rules = hub.auth.room_rules();
        if !rules.is_empty() {
            let claims = session.claims();
            rules.check(room, claims.as_deref().map(|c| &c.all))?;
        }
        if session.room_count() >= hub.limits.max_rooms_per_connection {
            return Err(HandleError::new(
                ErrorCode::RoomLimit,
                format!(
                    "a connection may be in at most {} rooms",
                    hub.limits.max_rooms_per_connection
                ),
            ));
        }
        let table = hub.registry.table_full();
        if let Some(hook) = table.join_hook(room) {
            ask_join_hook(hub, session, room, payload, hook).await?;
        }
    }
    let joined = hub
        .rooms
        .join(room, session, hub.limits.max_room_members)
        .map_err(|_| {
            HandleError::new(
                ErrorCode::RoomFull,
                format!(
                    "room `{room}` has {} members, the most it may have",
                    hub.limits.max_room_members
                ),
            )
        })?;
    if joined {
        if let Some(bus) = hub.rooms.bus() {
            // The ack means the member gets every frame published after it, on any node.
            bus.ready(room).await;
        }
        session.add_room(Arc::from(room));
        let payload = json!({
            "room": room,
            "connectionId": &*session.connection_id,
            "identity": &*session.identity.0,
        });
        let frame = protocol::host_frame("room.joined", Some(room), &payload);
        hub.rooms
            .broadcast(room, &frame, Some(&session.connection_id), None);
        if session.is_attached() {
            lifecycle::arrive(hub, room, session).await;
        }
        Box::pin(fire_event(
            hub,
            Some(session),
            HostEvent::RoomJoined,
            Some(room),
            &payload,
            depth,
        ))
        .await;
    }
    Ok(hub.rooms.members(room))
}

/// Asks the plugin hooking `room` whether `session` may join it: the hook's handler allows by
/// returning `ok` and refuses by returning an error (`forbidden`, with the plugin's message);
/// a call that fails (a trap, a timeout, an open circuit, an invalid effect) refuses too. What
/// the call recorded is discarded: a hook decides, it does not act.
async fn ask_join_hook(
    hub: &Hub,
    session: &Arc<Session>,
    room: &str,
    payload: &str,
    hook: &crate::registry::RouteTarget,
) -> Result<(), HandleError> {
    let id = &hook.plugin.manifest.id;
    let input = CallInput {
        handler: &hook.handler,
        ty: crate::manifest::HookPoint::RoomJoin.name(),
        room: Some(room),
        payload,
        sender: &session.identity.0,
        connection_id: &session.connection_id,
        message_id: None,
        metadata: None,
    };
    match call_checked(hub, &hook.plugin, &input).await {
        Ok(Checked { effects, .. }) => {
            if !effects.is_empty() {
                tracing::debug!(plugin = %id, %room, effects = effects.len(), "the join hook's effects are discarded");
            }
            effects::recycle(effects);
            Ok(())
        }
        Err(HandleError::Plugin { message, .. }) if !message.is_empty() => {
            Err(HandleError::new(ErrorCode::Forbidden, message))
        }
        Err(HandleError::Plugin { .. }) => Err(HandleError::new(
            ErrorCode::Forbidden,
            format!("plugin `{id}` refused the join of room `{room}`"),
        )),
        Err(failed) => {
            tracing::warn!(plugin = %id, %room, "join hook failed; the join is refused: {}", failed.wire().1);
            Err(HandleError::new(
                ErrorCode::Forbidden,
                format!(
                    "room `{room}` is guarded by plugin `{id}`, which could not decide: {}",
                    failed.wire().1
                ),
            ))
        }
    }
}

/// Makes the session leave a room. Returns false when it was not a member. An explicit leave
/// of an attached session counts its identity gone from the room at once; the ends of sessions
/// count presence themselves (see `lifecycle`).
pub async fn leave_room(
    hub: &Hub,
    session: &Arc<Session>,
    room: &str,
    reason: &str,
    depth: u8,
) -> bool {
    if !hub.rooms.leave(room, &session.connection_id) {
        return false;
    }
    session.remove_room(room);
    let payload = json!({
        "room": room,
        "connectionId": &*session.connection_id,
        "identity": &*session.identity.0,
        "reason": reason,
    });
    let frame = protocol::host_frame("room.left", Some(room), &payload);
    hub.rooms.broadcast(room, &frame, None, None);
    if session.is_attached() {
        lifecycle::depart(hub, room, &session.identity.0, false).await;
    }
    Box::pin(fire_event(
        hub,
        Some(session),
        HostEvent::RoomLeft,
        Some(room),
        &payload,
        depth,
    ))
    .await;
    true
}

/// Calls every plugin subscribed to `event` with `payload`; `origin` is the session the event
/// is about (none for an event about no one connection, such as an identity going offline).
pub async fn fire_event(
    hub: &Hub,
    origin: Option<&Arc<Session>>,
    event: HostEvent,
    room: Option<&str>,
    payload: &serde_json::Value,
    depth: u8,
) {
    if depth >= MAX_EVENT_DEPTH {
        return;
    }
    let table = hub.registry.table_full();
    let subscribers = table.subscribers(event);
    if subscribers.is_empty() {
        return;
    }
    let payload = payload.to_string();
    for target in subscribers {
        let input = CallInput {
            handler: &target.handler,
            ty: event.name(),
            room,
            payload: &payload,
            sender: origin.map_or("", |s| &s.identity.0),
            connection_id: origin.map_or("", |s| &s.connection_id),
            message_id: None,
            metadata: None,
        };
        if let Err(e) = run_call(hub, origin, &target.plugin, &input, depth + 1).await {
            tracing::warn!(plugin = %target.plugin.manifest.id, event = event.name(), "event handler failed: {}", e.wire().1);
        }
    }
}

/// Queues `sys.welcome` to a new session: who it is, and how to resume it.
pub fn welcome(conn: &ConnState) {
    let s = &conn.session;
    let payload = json!({
        "connectionId": &*s.connection_id,
        "sessionId": &*s.session_id,
        "identity": &*s.identity.0,
        "resumeToken": s.resume_token(),
        "resumed": false,
        "protocolVersion": protocol::PROTOCOL_VERSION,
        "hostVersion": env!("CARGO_PKG_VERSION"),
    });
    conn.push(protocol::host_frame("sys.welcome", None, &payload));
}

// ---------------------------------------------------------------------------------------------
// Timers and requests (plugin calls that come later, with no origin connection)
// ---------------------------------------------------------------------------------------------

/// Fires `connect` or `disconnect` for `session` (payload `{"connectionId", "identity"}`):
/// `connect` when a session starts, `disconnect` when it ends, after its rooms were left. The
/// `connect` and `disconnect` events of one identity are handled one at a time, in order.
pub async fn session_event(hub: &Hub, session: &Arc<Session>, event: HostEvent) {
    // The events of one identity reach the plugins one at a time, in the order they happened.
    let _turn = hub.identity_turns.turn("", &session.identity.0).await;
    let payload = json!({
        "connectionId": &*session.connection_id,
        "identity": &*session.identity.0,
    });
    Box::pin(fire_event(hub, Some(session), event, None, &payload, 0)).await;
}

/// Calls handler `handler` of plugin `plugin` on the version serving now, with `payload` and
/// no origin connection: a timer that came due (`ty` `timer`) or a request's outcome
/// (`request.outcome`). A plugin that is gone, or a version without the handler, drops it.
pub async fn call_later(hub: &Hub, plugin: &str, handler: &str, ty: &str, payload: &str) {
    let what = if ty == "timer" {
        "timer"
    } else {
        "request outcome"
    };
    let table = hub.registry.table_full();
    let Some(target) = table.plugin(plugin) else {
        tracing::warn!(%plugin, handler, "{what} dropped: plugin `{plugin}` is not loaded");
        return;
    };
    if !target.code.handler_names().contains(&handler) {
        tracing::warn!(
            %plugin,
            version = %target.version,
            "{what} dropped: the serving version of `{plugin}` has no handler `{handler}`"
        );
        return;
    }
    let input = CallInput {
        handler,
        ty,
        room: None,
        payload,
        sender: "",
        connection_id: "",
        message_id: None,
        metadata: None,
    };
    if let Err(e) = run_call(hub, None, target, &input, 0).await {
        tracing::warn!(%plugin, handler, "{what} call failed: {}", e.wire().1);
    }
}

/// Calls timers and request outcomes as they come due, each in a task of its own (tracked by
/// `tasks`, so that shutdown waits for calls in flight), until the host stops.
pub async fn run_later(
    hub: Arc<Hub>,
    tasks: tokio_util::task::TaskTracker,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            due = hub.registry.timers().next_due_batch() => {
                for timer in due {
                    let hub = hub.clone();
                    tasks.spawn(async move {
                        call_later(&hub, &timer.plugin, &timer.handler, "timer", &timer.payload)
                            .await;
                    });
                }
            }
            done = hub.registry.requests().next_completed() => {
                for request in done {
                    let hub = hub.clone();
                    tasks.spawn(async move {
                        call_later(
                            &hub,
                            &request.plugin,
                            &request.handler,
                            "request.outcome",
                            &request.outcome,
                        )
                        .await;
                    });
                }
            }
            _ = stop.wait_for(|stopped| *stopped) => break,
        }
    }
}

/// Applies a timer or request effect of `plugin`; `origin` is the connection whose message (or
/// event) the call handled, if any: a request's frame names its identity as `sender`.
fn apply_deferred(hub: &Hub, plugin: &LoadedPlugin, origin: Option<&Arc<Session>>, effect: Effect) {
    let id = &*plugin.manifest.id;
    let timers = hub.registry.timers();
    match effect {
        Effect::Schedule {
            id: timer,
            handler,
            delay_ms,
            payload,
        } => {
            if let Err(e) = timers.schedule(timer, id, handler, delay_ms, payload) {
                tracing::warn!(plugin = %id, "timer not scheduled: {e}");
            }
        }
        Effect::CancelTimer { id: timer } => {
            timers.cancel(id, timer);
        }
        Effect::Request {
            id: request,
            to,
            ty,
            payload,
            timeout_ms,
            handler,
        } => {
            let (room, targets) = match &to {
                RequestTo::Connection(to) => {
                    let target = hub.sessions.get(to);
                    // In a cluster, a connection of another node (its id names the node).
                    let elsewhere = target.is_none()
                        && hub.cluster.get().is_some()
                        && crate::session::node_of(to).is_some_and(|n| n != &**hub.sessions.node());
                    let who = MemberInfo {
                        connection_id: Arc::from(to.as_str()),
                        identity: target
                            .as_ref()
                            .map_or_else(|| Arc::from(""), |s| s.identity.0.clone()),
                    };
                    let targets = match target {
                        Some(_) => Targets::Members(vec![who]),
                        None if elsewhere => Targets::Members(vec![who]),
                        None => Targets::Gone(who),
                    };
                    (None, targets)
                }
                RequestTo::Room(room) => (
                    Some(room.clone()),
                    Targets::Members(hub.rooms.members(room)),
                ),
            };
            let recipients: Vec<Arc<str>> = match &targets {
                Targets::Members(members) => {
                    members.iter().map(|m| m.connection_id.clone()).collect()
                }
                Targets::Gone(_) => Vec::new(),
            };
            // Open before sending: an answer may come back before this function returns.
            if let Err(e) = hub.registry.requests().open(
                request,
                id,
                handler,
                room.clone(),
                targets,
                timeout_ms,
            ) {
                tracing::warn!(plugin = %id, "request not sent: {e}");
                return;
            }
            let frame = Outbound {
                ty: &ty,
                room: room.as_deref(),
                payload: &payload,
                sender: origin.map(|s| &*s.identity.0),
            }
            .encode_with_id(request);
            if let Some(cluster) = hub.cluster.get()
                && recipients.iter().any(|to| hub.sessions.get(to).is_none())
            {
                // Answers from the other nodes find their way back here.
                cluster.requested(request, std::time::Duration::from_millis(timeout_ms));
            }
            for to in recipients {
                hub.sessions.deliver(&to, frame.clone());
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::ack_fields;

    #[test]
    fn ack_fields_are_a_compact_object_without_ref() {
        assert_eq!(ack_fields(" { } "), Ok(None));
        assert_eq!(ack_fields(r#"{"ref": "x"}"#), Ok(None));
        assert_eq!(
            ack_fields(r#"{ "ref": "x", "n" : 1 }"#),
            Ok(Some(r#"{"n":1}"#.to_owned()))
        );
        assert!(ack_fields("[1]").is_err());
        assert!(ack_fields("{").is_err());
    }
}
