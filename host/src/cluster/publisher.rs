//! The publisher: one task sends everything this node tells the other nodes, in the order it
//! was queued, pipelined (everything queued meanwhile goes in one round trip). A batch that
//! fails is sent again once Redis answers (the receivers drop what they already had, by the
//! origin's publication number); a frame that cannot be sent within the publish timeout is
//! dropped and its origin session told (`unavailable`). Membership changes are never dropped.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use super::link::Backoff;
use super::wire::{self, Kind, Publication};
use super::{Shared, joined_key, journal_key, record_key, sessions_of_node};
use crate::error::ErrorCode;
use crate::protocol::{self, Frame};
use crate::session::outbox::Outbox;

/// Most jobs sent in one round trip.
const BATCH: usize = 512;

/// Something to tell the other nodes.
#[derive(Debug)]
pub enum Job {
    /// A publication to a room.
    Room {
        room: Arc<str>,
        what: RoomJob,
        queued: Instant,
    },
    /// A frame for a connection of another node.
    Direct {
        node: Arc<str>,
        connection_id: Arc<str>,
        body: Frame,
        queued: Instant,
    },
    /// An identity's presence status (`None`: cleared).
    Status {
        identity: Arc<str>,
        status: Option<Arc<str>>,
    },
    /// Answered once everything queued before it was sent.
    Flush(oneshot::Sender<()>),
    /// Frame `seq` of a session's stream, for its journal.
    Journal {
        session: Arc<str>,
        seq: u64,
        entry: JournalJob,
        /// Told once it is saved.
        outbox: Outbox,
        queued: Instant,
    },
    /// A session began on this node: its record.
    Opened {
        session: Arc<str>,
        fields: Vec<(&'static str, String)>,
    },
    /// A session ended: its record and journal go.
    Ended {
        session: Arc<str>,
        connection_id: Arc<str>,
    },
    /// This node let a session go to another node.
    Released { session: Arc<str> },
    /// A request of this node awaits answers from connections of other nodes until `ttl`.
    Requested { id: u64, ttl: std::time::Duration },
}

/// What a session's journal saves of a frame.
#[derive(Debug)]
pub enum JournalJob {
    /// A room's frame, kept in the room's stream at this offset.
    Room { room: Arc<str>, offset: u64 },
    /// The session's own frame.
    Frame(Frame),
}

#[derive(Debug)]
pub enum RoomJob {
    Frame {
        except: Option<Arc<str>>,
        volatile: bool,
        /// Its origin's members get it from the subscriber, in the room's order.
        ordered: bool,
        body: Frame,
        /// The session that caused it, told when it cannot be sent.
        origin: Option<Outbox>,
    },
    Joined {
        connection_id: Arc<str>,
        identity: Arc<str>,
    },
    Left {
        connection_id: Arc<str>,
    },
}

pub async fn run(shared: Arc<Shared>, mut jobs: mpsc::UnboundedReceiver<Job>) {
    let mut pending: VecDeque<(u64, Job)> = VecDeque::new();
    let mut flushes: Vec<oneshot::Sender<()>> = Vec::new();
    let mut next_number = 1u64;
    let mut backoff = Backoff::default();
    let mut take = |job: Job, pending: &mut VecDeque<(u64, Job)>, flushes: &mut Vec<_>| match job {
        Job::Flush(done) => flushes.push(done),
        job => {
            pending.push_back((next_number, job));
            next_number += 1;
        }
    };
    loop {
        if pending.is_empty() {
            for done in flushes.drain(..) {
                let _ = done.send(());
            }
            match jobs.recv().await {
                Some(job) => take(job, &mut pending, &mut flushes),
                None => return,
            }
        }
        while pending.len() < BATCH {
            match jobs.try_recv() {
                Ok(job) => take(job, &mut pending, &mut flushes),
                Err(_) => break,
            }
        }
        if pending.is_empty() {
            continue;
        }
        let result = send(&shared, &pending).await;
        shared.link.outcome(&result).await;
        match result {
            Ok(()) => {
                tracing::trace!(count = pending.len(), "cluster: published");
                mark_saved(&pending);
                shared
                    .stats
                    .published
                    .fetch_add(pending.len() as u64, Ordering::Relaxed);
                pending.clear();
                backoff.reset();
            }
            Err(e) => {
                shared.stats.publish_retries.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("cluster: publishing failed, retrying: {e}");
                // Redis is out of reach: connections stop waiting for their frames to be saved
                // (the node serves its clients; a resume elsewhere will say what it lost).
                mark_saved(&pending);
                drop_expired(&shared, &mut pending);
                tokio::time::sleep(backoff.next()).await;
            }
        }
    }
}

async fn send(shared: &Shared, pending: &VecDeque<(u64, Job)>) -> redis::RedisResult<()> {
    let mut conn = shared.link.get().await?;
    let mut pipe = redis::pipe();
    let scripts = &shared.link.scripts;
    let publish = scripts.publish.get_hash();
    let mut journal: Option<redis::Cmd> = None;
    let epoch_candidate = format!("{:016x}", rand::random::<u64>());
    for (number, job) in pending {
        match job {
            Job::Room { room, what, .. } => {
                let (tag, member, value, kind) = match what {
                    RoomJob::Frame {
                        except,
                        volatile,
                        ordered,
                        body,
                        ..
                    } => (
                        if *volatile { "V" } else { "F" },
                        "",
                        String::new(),
                        Kind::Frame {
                            except: except.as_deref(),
                            volatile: *volatile,
                            ordered: *ordered,
                            body: body.as_str(),
                        },
                    ),
                    RoomJob::Joined {
                        connection_id,
                        identity,
                    } => (
                        "J",
                        &**connection_id,
                        wire::member_value(&shared.node, identity),
                        Kind::Joined {
                            connection_id,
                            identity,
                        },
                    ),
                    RoomJob::Left { connection_id } => (
                        "L",
                        &**connection_id,
                        String::new(),
                        Kind::Left { connection_id },
                    ),
                };
                let publication = Publication {
                    origin: &shared.node,
                    number: *number,
                    kind,
                };
                pipe.cmd("EVALSHA")
                    .arg(publish)
                    .arg(0)
                    .arg(&**room)
                    .arg(tag)
                    .arg(publication.encode())
                    .arg(member)
                    .arg(value)
                    .arg(&*shared.node)
                    .arg(&epoch_candidate)
                    .arg(shared.config.stream_length)
                    .arg(shared.config.room_ttl.as_secs().max(1))
                    .ignore();
            }
            Job::Direct {
                node,
                connection_id,
                body,
                ..
            } => {
                pipe.cmd("EVALSHA")
                    .arg(scripts.direct.get_hash())
                    .arg(0)
                    .arg(&**connection_id)
                    .arg(&**node)
                    .arg(wire::direct(connection_id, body.as_str()))
                    .ignore();
            }
            Job::Journal {
                session,
                seq,
                entry,
                ..
            } => {
                // One script call saves every frame of the batch, after its publications.
                let call = journal.get_or_insert_with(|| {
                    let mut call = redis::cmd("EVALSHA");
                    call.arg(scripts.journal.get_hash())
                        .arg(0)
                        .arg(shared.journal_length);
                    call
                });
                call.arg(&**session).arg(*seq);
                match entry {
                    JournalJob::Room { room, offset } => {
                        call.arg("r").arg(&**room).arg(*offset);
                    }
                    JournalJob::Frame(frame) => {
                        call.arg("f").arg(frame.as_str()).arg("");
                    }
                }
            }
            Job::Opened { session, fields } => {
                let key = record_key(session);
                pipe.cmd("HSET").arg(&key).arg("node").arg(&*shared.node);
                for (name, value) in fields {
                    pipe.arg(*name).arg(value);
                }
                pipe.ignore();
                pipe.cmd("SADD")
                    .arg(sessions_of_node(&shared.node))
                    .arg(&**session)
                    .ignore();
            }
            Job::Ended {
                session,
                connection_id,
            } => {
                pipe.cmd("DEL")
                    .arg(record_key(session))
                    .arg(journal_key(session))
                    .arg(joined_key(connection_id))
                    .ignore();
                pipe.cmd("SREM")
                    .arg(sessions_of_node(&shared.node))
                    .arg(&**session)
                    .ignore();
                pipe.cmd("HDEL")
                    .arg("plexus:moved")
                    .arg(&**connection_id)
                    .ignore();
            }
            Job::Requested { id, ttl } => {
                pipe.cmd("SET")
                    .arg(format!("plexus:q:{id}"))
                    .arg(&*shared.node)
                    .arg("PX")
                    .arg(
                        u64::try_from(ttl.as_millis())
                            .unwrap_or(u64::MAX)
                            .saturating_add(5000),
                    )
                    .ignore();
            }
            Job::Released { session } => {
                let key = record_key(session);
                let ttl = shared.resume_ttl.as_millis().max(1) as u64;
                pipe.cmd("HSET").arg(&key).arg("node").arg("").ignore();
                for key in [key.clone(), journal_key(session)] {
                    pipe.cmd("PEXPIRE").arg(key).arg(ttl).ignore();
                }
                pipe.cmd("SREM")
                    .arg(sessions_of_node(&shared.node))
                    .arg(&**session)
                    .ignore();
            }
            Job::Status { identity, status } => match status {
                Some(status) => {
                    pipe.cmd("HSET")
                        .arg("plexus:status")
                        .arg(&**identity)
                        .arg(&**status)
                        .ignore();
                }
                None => {
                    pipe.cmd("HDEL")
                        .arg("plexus:status")
                        .arg(&**identity)
                        .ignore();
                }
            },
            Job::Flush(_) => {}
        }
    }
    if let Some(call) = journal {
        pipe.add_command(call).ignore();
    }
    pipe.query_async::<()>(&mut conn).await
}

/// Tells the sessions whose frames were in a batch that they may write them (saved, or Redis is
/// out of reach).
fn mark_saved(pending: &VecDeque<(u64, Job)>) {
    for (_, job) in pending {
        if let Job::Journal { seq, outbox, .. } = job {
            outbox.saved(*seq);
        }
    }
}

/// Drops the frames queued longer than the publish timeout, telling their origins.
fn drop_expired(shared: &Shared, pending: &mut VecDeque<(u64, Job)>) {
    let timeout = shared.config.publish_timeout;
    pending.retain(|(_, job)| {
        let (queued, room, origin) = match job {
            Job::Room {
                room,
                what: RoomJob::Frame { origin, .. },
                queued,
            } => (*queued, Some(room), origin.as_ref()),
            Job::Direct { queued, .. } | Job::Journal { queued, .. } => (*queued, None, None),
            _ => return true,
        };
        if queued.elapsed() < timeout {
            return true;
        }
        shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
        if let (Some(origin), Some(room)) = (origin, room) {
            origin.push(protocol::error(
                None,
                ErrorCode::Unavailable.as_str(),
                &format!(
                    "a broadcast to room `{room}` could not reach the other nodes of the cluster"
                ),
            ));
        }
        false
    });
}
