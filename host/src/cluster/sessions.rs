//! Sessions that outlive their node: each session's record and the journal of its frames live
//! in Redis, so that a client can resume on any node. The journal holds a reference (room and
//! offset) for a room's frame, which the room's stream keeps once for every member, and the
//! frame itself for the session's own frames. While Redis answers, a connection writes only
//! what the journal saved ([`crate::session::journal`]), so whatever a client has seen another
//! node can give it again.
//!
//! A session moves ([`adopt`]) once its node let it go (asked over its node channel:
//! [`release`]) or died (its lease ran out). The new node rebuilds its stream from the journal,
//! joins its rooms again, and gives it every frame its rooms published after the last one the
//! journal holds from each (or after it joined), read from the rooms' streams: the frames
//! published while it was between nodes, and those its old node had not saved.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::RedisResult;
use serde_json::json;
use subtle::ConstantTimeEq;

use super::publisher::{Job, JournalJob};
use super::wire::{self, Kind};
use super::{
    Cluster, channel_of_node, entry_number, joined_key, journal_key, record_key, stream_of_room,
};
use crate::error::CloseReason;
use crate::protocol::{self, Frame};
use crate::router::Hub;
use crate::session::journal::{Journal, Source};
use crate::session::outbox::{self, Outbox};
use crate::session::{Identity, Opened, Session};

/// The connection id field that marks a request to let a session go, on a node's channel.
pub const RELEASE: &str = "!release";

/// How often a node waiting for a session to be let go looks again.
const CLAIM_POLL: Duration = Duration::from_millis(50);

/// What a session's record keeps of its resume token: its SHA-256.
fn token_digest(token: &str) -> String {
    super::rollout::content_hash(token.as_bytes())
}

impl Journal for Cluster {
    fn append(
        &self,
        session: &Arc<str>,
        seq: u64,
        frame: &Frame,
        source: Source<'_>,
        outbox: &Outbox,
    ) {
        let entry = match source {
            Source::Room { room, offset } => JournalJob::Room {
                room: room.clone(),
                offset,
            },
            Source::Own => JournalJob::Frame(frame.clone()),
        };
        let _ = self.jobs.send(Job::Journal {
            session: session.clone(),
            seq,
            entry,
            outbox: outbox.clone(),
            queued: Instant::now(),
        });
    }

    fn holding(&self) -> bool {
        self.shared.link.is_up()
    }

    fn opened(&self, session: &Session) {
        let _ = self.jobs.send(Job::Opened {
            session: session.session_id.clone(),
            fields: vec![
                ("cid", session.connection_id.to_string()),
                ("identity", session.identity.0.to_string()),
                ("token", token_digest(session.resume_token())),
                (
                    "auth",
                    if session.claims().is_some() { "1" } else { "0" }.to_owned(),
                ),
            ],
        });
    }

    fn ended(&self, session: &Session) {
        let _ = self.jobs.send(Job::Ended {
            session: session.session_id.clone(),
            connection_id: session.connection_id.clone(),
        });
    }
}

/// Why a session could not move here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// The `resume_failed` reason.
    pub reason: &'static str,
    pub message: String,
}

fn refused(reason: &'static str, message: impl Into<String>) -> Refused {
    Refused {
        reason,
        message: message.into(),
    }
}

/// One entry of a session's journal, read back.
#[derive(Debug)]
enum Saved {
    Room { room: Arc<str>, offset: u64 },
    Frame(Frame),
}

/// What a resume asks for.
#[derive(Debug)]
pub struct Resume<'a> {
    pub session_id: &'a str,
    pub resume_token: &'a str,
    pub last_seq: u64,
    /// Whether the resuming connection was admitted with a token, and as whom.
    pub authenticated: bool,
    pub identity: &'a Identity,
}

/// Moves the session `resume` names here from the node it was on: waits until that node let it
/// go or died (bounded by its lease), then rebuilds it. The session is returned detached, its
/// stream holding every frame after `last_seq`, for the resume to attach.
pub async fn adopt(
    cluster: &Cluster,
    hub: &Hub,
    resume: Resume<'_>,
) -> Result<Arc<Session>, Refused> {
    let shared = &cluster.shared;
    let down = |e: redis::RedisError| {
        refused(
            "unavailable",
            format!("the cluster's store is out of reach: {e}"),
        )
    };
    let mut conn = shared.link.get().await.map_err(down)?;
    let record: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(record_key(resume.session_id))
        .query_async(&mut conn)
        .await
        .map_err(down)?;
    let (Some(cid), Some(identity), Some(token)) = (
        record.get("cid"),
        record.get("identity"),
        record.get("token"),
    ) else {
        return Err(refused(
            "unknown_session",
            format!(
                "no session `{}` on any node (it ended, or waited longer than the resume time)",
                resume.session_id
            ),
        ));
    };
    let digest = token_digest(resume.resume_token);
    if !bool::from(digest.as_bytes().ct_eq(token.as_bytes())) {
        return Err(refused("bad_token", "the resume token does not match"));
    }
    let was_authenticated = record.get("auth").is_some_and(|a| a == "1");
    if (was_authenticated || resume.authenticated) && *resume.identity.0 != **identity {
        return Err(refused(
            "forbidden",
            "that session belongs to another identity",
        ));
    }
    // Its node lets it go, or dies: wait for either, at most for as long as a lease lasts.
    let owner = record.get("node").cloned().unwrap_or_default();
    if !owner.is_empty() && owner != *shared.node {
        let _ = redis::cmd("PUBLISH")
            .arg(channel_of_node(&owner))
            .arg(wire::direct(RELEASE, resume.session_id))
            .query_async::<()>(&mut conn)
            .await;
    }
    let deadline = Instant::now() + shared.config.node_ttl + shared.config.node_ttl / 2;
    loop {
        let claimed: String = shared
            .link
            .scripts
            .claim
            .arg(resume.session_id)
            .arg(&*shared.node)
            .invoke_async(&mut conn)
            .await
            .map_err(down)?;
        match claimed.as_str() {
            "ok" => break,
            "gone" => {
                return Err(refused(
                    "unknown_session",
                    format!("session `{}` ended meanwhile", resume.session_id),
                ));
            }
            _ if Instant::now() >= deadline => {
                return Err(refused(
                    "busy",
                    format!(
                        "node {owner} neither let session `{}` go nor died: try again",
                        resume.session_id
                    ),
                ));
            }
            _ => tokio::time::sleep(CLAIM_POLL).await,
        }
    }
    let joined: HashMap<String, u64> = redis::cmd("HGETALL")
        .arg(joined_key(cid))
        .query_async(&mut conn)
        .await
        .map_err(down)?;
    let entries: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
        .arg(journal_key(resume.session_id))
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .map_err(down)?;
    let mut saved: Vec<(u64, Saved)> = Vec::with_capacity(entries.len());
    for (id, mut fields) in entries {
        let Some(seq) = entry_number(&id) else {
            continue;
        };
        let entry = match (fields.remove("r"), fields.remove("o"), fields.remove("f")) {
            (Some(room), Some(offset), _) => Saved::Room {
                room: Arc::from(room),
                offset: offset.parse().unwrap_or(0),
            },
            (_, _, Some(frame)) => Saved::Frame(Frame::from(frame)),
            _ => continue,
        };
        saved.push((seq, entry));
    }
    // Where each room's frames resume: after the last one saved, or after the join.
    let mut cursors: HashMap<Arc<str>, u64> = joined
        .into_iter()
        .map(|(room, offset)| (Arc::from(room), offset))
        .collect();
    for (_, entry) in &saved {
        if let Saved::Room { room, offset } = entry
            && let Some(cursor) = cursors.get_mut(room)
        {
            *cursor = (*cursor).max(*offset);
        }
    }
    let last_saved = saved.last().map_or(0, |(seq, _)| *seq);
    if resume.last_seq > last_saved {
        return Err(refused(
            "gap",
            format!(
                "lastSeq {} is ahead of the last saved seq {last_saved}: its node died before saving it",
                resume.last_seq
            ),
        ));
    }
    // The session's own frames hold the answers of its retry window.
    let answers: Vec<Frame> = saved
        .iter()
        .filter_map(|(_, entry)| match entry {
            Saved::Frame(frame) => Some(frame.clone()),
            Saved::Room { .. } => None,
        })
        .collect();
    let wanted: Vec<(u64, Saved)> = saved
        .into_iter()
        .filter(|(seq, _)| *seq > resume.last_seq)
        .collect();
    if let Some((first, _)) = wanted.first()
        && *first != resume.last_seq + 1
    {
        return Err(refused(
            "gap",
            format!(
                "frames {} to {} are no longer saved",
                resume.last_seq + 1,
                first - 1
            ),
        ));
    }
    let wanted_len = wanted.len() as u64;
    if wanted_len != last_saved - resume.last_seq {
        return Err(refused("gap", "the saved frames have a hole"));
    }
    let kept = resolve(&mut conn, wanted).await.map_err(|e| match e {
        Resolve::Redis(e) => down(e),
        Resolve::Trimmed { room, offset } => refused(
            "gap",
            format!("frame {offset} of room `{room}` is no longer kept"),
        ),
    })?;
    let journal: Arc<dyn Journal> = hub
        .sessions
        .journal()
        .cloned()
        .ok_or_else(|| refused("unavailable", "this node keeps no journal"))?;
    let session_id: Arc<str> = Arc::from(resume.session_id);
    let stream = outbox::moved(
        hub.policy.bounds,
        journal,
        session_id.clone(),
        last_saved + 1,
        kept,
    );
    let session = hub.sessions.adopt(Opened {
        connection_id: Arc::from(cid.as_str()),
        session_id,
        identity: Identity(Arc::from(identity.as_str())),
        resume_token: resume.resume_token.into(),
        outbox: stream,
        policy: &hub.policy,
    });
    crate::lifecycle::awaiting_resume(hub, &session);
    // Its retry window: the answers among its saved frames.
    {
        let now = Instant::now();
        let mut dedupe = session.dedupe();
        for frame in answers {
            if let Some(id) = answered(&frame) {
                dedupe.record(&id, frame, now);
            }
        }
    }
    // Its rooms again: from now on their frames reach it (held until the recovered ones).
    let mut rooms: Vec<(Arc<str>, u64)> = cursors.into_iter().collect();
    rooms.sort();
    let mut rooms_joined = Vec::with_capacity(rooms.len());
    for (room, cursor) in rooms {
        match hub.rooms.join(&room, &session, hub.limits.max_room_members) {
            Ok(_) => {
                session.add_room(room.clone());
                if let Some(bus) = hub.rooms.bus() {
                    bus.ready(&room).await;
                }
                rooms_joined.push((room, cursor));
            }
            Err(crate::rooms::RoomFull) => {
                tracing::warn!(%room, session = %session.session_id, "cluster: a moved session's room is full here: it left it");
            }
        }
    }
    let rooms = rooms_joined;
    let mut recovered = Vec::new();
    let mut back = Vec::new();
    for (room, cursor) in &rooms {
        match recover(&mut conn, room, *cursor, &session.connection_id).await {
            Ok((frames, reaped)) => {
                recovered.extend(frames);
                if reaped {
                    back.push(room.clone());
                }
            }
            Err(e) => {
                session.outbox.release(recovered);
                crate::lifecycle::end_session(hub, &session, crate::lifecycle::End::Expired).await;
                return Err(down(e));
            }
        }
    }
    session.outbox.release(recovered);
    // The rooms that were told it left with its node hear it is back.
    for room in back {
        let payload = json!({
            "room": &*room,
            "connectionId": &*session.connection_id,
            "identity": &*session.identity.0,
        });
        let frame = protocol::host_frame("room.joined", Some(&room), &payload);
        hub.rooms
            .broadcast(&room, &frame, Some(&session.connection_id), None);
        crate::router::fire_event(
            hub,
            Some(&session),
            crate::manifest::HostEvent::RoomJoined,
            Some(&room),
            &payload,
            0,
        )
        .await;
    }
    tracing::info!(session = %session.session_id, connection = %session.connection_id, from = %owner, "cluster: a session moved here");
    Ok(session)
}

/// The client `messageId` a saved frame answers, if it is a `sys.ack` or a `sys.error` naming
/// one.
fn answered(frame: &Frame) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(frame.as_str()).ok()?;
    if !matches!(value["type"].as_str(), Some("sys.ack" | "sys.error")) {
        return None;
    }
    value["payload"]["ref"].as_str().map(str::to_owned)
}

enum Resolve {
    Redis(redis::RedisError),
    Trimmed { room: Arc<str>, offset: u64 },
}

/// The frames of saved journal entries: a room's frame is read from the room's stream.
async fn resolve(
    conn: &mut redis::aio::MultiplexedConnection,
    wanted: Vec<(u64, Saved)>,
) -> Result<Vec<(u64, Frame)>, Resolve> {
    let mut spans: HashMap<Arc<str>, (u64, u64)> = HashMap::new();
    for (_, entry) in &wanted {
        if let Saved::Room { room, offset } = entry {
            let span = spans.entry(room.clone()).or_insert((*offset, *offset));
            span.0 = span.0.min(*offset);
            span.1 = span.1.max(*offset);
        }
    }
    let mut bodies: HashMap<(Arc<str>, u64), Frame> = HashMap::new();
    for (room, (low, high)) in spans {
        let entries: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
            .arg(stream_of_room(&room))
            .arg(format!("0-{low}"))
            .arg(format!("0-{high}"))
            .query_async(conn)
            .await
            .map_err(Resolve::Redis)?;
        for (id, fields) in entries {
            let Some(offset) = entry_number(&id) else {
                continue;
            };
            if let Some(Ok(publication)) = fields.get(1).map(|t| wire::decode(t))
                && let Kind::Frame { body, .. } = publication.kind
            {
                bodies.insert((room.clone(), offset), Frame::from(body));
            }
        }
    }
    wanted
        .into_iter()
        .map(|(seq, entry)| match entry {
            Saved::Frame(frame) => Ok((seq, frame)),
            Saved::Room { room, offset } => bodies
                .remove(&(room.clone(), offset))
                .map(|frame| (seq, frame))
                .ok_or(Resolve::Trimmed { room, offset }),
        })
        .collect()
}

/// The frames `room` published after offset `cursor` that a member `connection_id` gets, as
/// the subscriber would have delivered them; what the stream no longer holds is told as a
/// `room.gap`. Also says whether the member was ended with its node meanwhile.
type Recovered = (Vec<outbox::Placed>, bool);

async fn recover(
    conn: &mut redis::aio::MultiplexedConnection,
    room: &Arc<str>,
    cursor: u64,
    connection_id: &str,
) -> RedisResult<Recovered> {
    let entries: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
        .arg(stream_of_room(room))
        .arg(format!("0-{}", cursor + 1))
        .arg("+")
        .query_async(conn)
        .await?;
    let mut frames = Vec::new();
    let mut reaped = false;
    let mut expected = cursor + 1;
    for (id, fields) in entries {
        let Some(offset) = entry_number(&id) else {
            continue;
        };
        if offset > expected {
            let frame = protocol::host_frame(
                "room.gap",
                Some(room),
                &json!({"room": &**room, "missed": offset - expected}),
            );
            frames.push((frame, None));
        }
        expected = offset + 1;
        let Some(Ok(publication)) = fields.get(1).map(|t| wire::decode(t)) else {
            continue;
        };
        let frame = match publication.kind {
            Kind::Frame {
                except,
                volatile: false,
                body,
                ..
            } if except != Some(connection_id) => Frame::from(body),
            Kind::Left {
                connection_id: gone,
            } if publication.number == 0 && gone == connection_id => {
                reaped = true;
                continue;
            }
            Kind::Left {
                connection_id: gone,
            } if publication.number == 0 => super::subscriber::node_lost(room, gone, None),
            Kind::Offline { identity } => {
                crate::lifecycle::presence_frame(room, identity, "offline", None)
            }
            _ => continue,
        };
        frames.push((frame, Some((room.clone(), offset))));
    }
    Ok((frames, reaped))
}

/// Another node asks for `session_id`: the connection driving it, if any, is closed after the
/// message in hand (4000), everything queued for it is saved, and it is let go without leaving
/// its rooms (it joins them again where it moves).
pub async fn release(cluster: Arc<Cluster>, hub: Arc<Hub>, session_id: String) {
    let Ok(session) = hub.sessions.find(&session_id) else {
        return;
    };
    let driver = session.take_over(CloseReason::TakenOver).await;
    // Present in its rooms while a connection drove it (a detached session departed then).
    let was_attached = session.is_attached();
    if !session.mark_ended() {
        return;
    }
    session.outbox.end(CloseReason::TakenOver);
    for room in session.rooms() {
        hub.rooms.forget(&room, &session.connection_id);
        if was_attached {
            crate::lifecycle::depart(&hub, &room, &session.identity.0, false).await;
        }
    }
    hub.registry.requests().ended(&session.connection_id);
    hub.sessions.forget(&session);
    let _ = cluster.jobs.send(Job::Released {
        session: session.session_id.clone(),
    });
    cluster.flush().await;
    drop(driver);
    tracing::info!(session = %session_id, "cluster: a session moved to another node");
}
