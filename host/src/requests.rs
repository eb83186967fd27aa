//! Requests with client acks ("emit with ack"): a plugin sends a frame to a connection or a
//! room and asks for each client's `sys.reply`; this module gathers the answers, bounded, until
//! every target answered or the timeout passed, and hands the outcome to the task that calls
//! the plugin's handler with it.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Serialize;
use serde_json::value::RawValue;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::rooms::MemberInfo;

/// Most requests one plugin may have pending.
pub const MAX_REQUESTS_PER_PLUGIN: usize = 10_000;
/// The longest timeout of a request, in milliseconds (5 minutes).
pub const MAX_REQUEST_TIMEOUT_MS: u64 = 5 * 60 * 1000;
/// The largest answer one client may give (its `sys.reply` payload), in bytes.
pub const MAX_ANSWER_BYTES: usize = 64 << 10;
/// The most bytes of answers one request gathers (a room request's answers together).
pub const MAX_ANSWERS_BYTES: usize = 4 << 20;

/// Why a request was not opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("a request timeout must be between 1 and {MAX_REQUEST_TIMEOUT_MS} ms, not {0}")]
    BadTimeout(u64),
    #[error("plugin `{0}` has {MAX_REQUESTS_PER_PLUGIN} requests pending, the limit")]
    TooMany(String),
}

/// Why a client's `sys.reply` was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    /// No pending request awaits an answer from this connection to that frame: the `ref` is
    /// not a host frame's id, the request timed out or was answered already.
    #[error("no request awaits your answer to `{0}` (unknown, expired or already answered)")]
    UnknownRef(String),
    #[error("an answer of {0} bytes is larger than the limit of {MAX_ANSWER_BYTES} bytes")]
    AnswerTooLarge(usize),
    #[error("the answers to this request already hold {MAX_ANSWERS_BYTES} bytes, the limit")]
    AnswersFull,
}

/// Whom a request waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Targets {
    /// These connections (one, or a room's members when the request was sent).
    Members(Vec<MemberInfo>),
    /// Nobody: the one connection asked is gone (it is reported missing at once).
    Gone(MemberInfo),
}

/// A request that completed: call `handler` of plugin `plugin` with `outcome` (JSON text of an
/// [`Outcome`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completed {
    pub id: u64,
    pub plugin: Arc<str>,
    pub handler: String,
    pub outcome: String,
}

/// What a plugin's handler receives when its request completes.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Outcome<'a> {
    pub request_id: u64,
    /// The room of a room request; `null` for a request to one connection.
    pub room: Option<&'a str>,
    pub answers: Vec<Answer<'a>>,
    /// The targets that did not answer in time (or were gone).
    pub missing: Vec<Who<'a>>,
}

/// One client's answer.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Answer<'a> {
    pub connection_id: &'a str,
    pub identity: &'a str,
    pub payload: &'a RawValue,
}

/// A target of a request.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Who<'a> {
    pub connection_id: &'a str,
    pub identity: &'a str,
}

#[derive(Debug)]
struct Pending {
    plugin: Arc<str>,
    handler: String,
    room: Option<String>,
    /// Targets that have not answered yet.
    waiting: Vec<MemberInfo>,
    /// Targets whose session ended before they answered.
    gone: Vec<MemberInfo>,
    answers: Vec<(MemberInfo, Box<RawValue>)>,
    answer_bytes: usize,
    due: Instant,
}

impl Pending {
    fn complete(self, id: u64) -> Completed {
        let outcome = Outcome {
            request_id: id,
            room: self.room.as_deref(),
            answers: self
                .answers
                .iter()
                .map(|(who, payload)| Answer {
                    connection_id: &who.connection_id,
                    identity: &who.identity,
                    payload,
                })
                .collect(),
            missing: self
                .waiting
                .iter()
                .chain(&self.gone)
                .map(|who| Who {
                    connection_id: &who.connection_id,
                    identity: &who.identity,
                })
                .collect(),
        };
        // Strings, numbers and raw JSON values: serialization cannot fail.
        let outcome = serde_json::to_string(&outcome).unwrap_or_else(|_| "null".into());
        Completed {
            id,
            plugin: self.plugin,
            handler: self.handler,
            outcome,
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    pending: HashMap<u64, Pending>,
    /// (due, id) of every pending request; a completed one's entry is skipped when it comes up.
    heap: BinaryHeap<Reverse<(Instant, u64)>>,
    per_plugin: HashMap<Arc<str>, usize>,
    /// The pending requests awaiting each connection's answer.
    by_connection: HashMap<Arc<str>, Vec<u64>>,
    /// Completed before their timeout, waiting for the driver.
    done: Vec<Completed>,
}

impl Inner {
    /// Request `id` no longer awaits `connection`'s answer.
    fn unindex(&mut self, connection: &str, id: u64) {
        if let Some(ids) = self.by_connection.get_mut(connection) {
            ids.retain(|i| *i != id);
            if ids.is_empty() {
                self.by_connection.remove(connection);
            }
        }
    }

    fn finish(&mut self, id: u64) -> Option<Completed> {
        let pending = self.pending.remove(&id)?;
        for who in &pending.waiting {
            self.unindex(&who.connection_id, id);
        }
        if let Some(n) = self.per_plugin.get_mut(&pending.plugin) {
            *n -= 1;
            if *n == 0 {
                self.per_plugin.remove(&pending.plugin);
            }
        }
        if self.heap.len() > 1024 && self.heap.len() > 2 * self.pending.len() {
            self.heap = self
                .pending
                .iter()
                .map(|(id, p)| Reverse((p.due, *id)))
                .collect();
        }
        Some(pending.complete(id))
    }
}

/// Every pending request of a host, by the id of the frame that asked (its `messageId` is
/// `h-<id>`).
#[derive(Debug, Default)]
pub struct Requests {
    inner: Mutex<Inner>,
    /// Woken when a request completes early or one is opened that may time out first.
    changed: Notify,
}

/// The request id a `sys.reply`'s `ref` names: the number of a host `messageId` `h-<n>`.
pub fn parse_ref(reference: &str) -> Option<u64> {
    reference.strip_prefix("h-")?.parse().ok()
}

impl Requests {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // No code holding this lock panics midway through an update.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many requests plugin `plugin` has pending.
    pub fn pending(&self, plugin: &str) -> usize {
        self.lock().per_plugin.get(plugin).copied().unwrap_or(0)
    }

    /// Opens request `id` (the number of the frame's `messageId`) of plugin `plugin` awaiting
    /// answers from `targets` for `timeout_ms`. With no target to wait for it completes at
    /// once: nobody missing (a room request to an empty room), or the connection that is gone.
    pub fn open(
        &self,
        id: u64,
        plugin: &str,
        handler: String,
        room: Option<String>,
        targets: Targets,
        timeout_ms: u64,
    ) -> Result<(), RequestError> {
        let (targets, gone) = match targets {
            Targets::Members(members) => (members, None),
            Targets::Gone(who) => (Vec::new(), Some(who)),
        };
        if timeout_ms == 0 || timeout_ms > MAX_REQUEST_TIMEOUT_MS {
            return Err(RequestError::BadTimeout(timeout_ms));
        }
        let due = Instant::now() + Duration::from_millis(timeout_ms);
        let mut inner = self.lock();
        if inner.per_plugin.get(plugin).copied().unwrap_or(0) >= MAX_REQUESTS_PER_PLUGIN {
            return Err(RequestError::TooMany(plugin.to_owned()));
        }
        let plugin: Arc<str> = match inner.per_plugin.get_key_value(plugin) {
            Some((key, _)) => key.clone(),
            None => Arc::from(plugin),
        };
        let pending = Pending {
            plugin: plugin.clone(),
            handler,
            room,
            waiting: targets,
            gone: Vec::new(),
            answers: Vec::new(),
            answer_bytes: 0,
            due,
        };
        if pending.waiting.is_empty() {
            let mut pending = pending;
            pending.gone.extend(gone);
            inner.done.push(pending.complete(id));
        } else {
            *inner.per_plugin.entry(plugin).or_default() += 1;
            for who in &pending.waiting {
                let ids = inner
                    .by_connection
                    .entry(who.connection_id.clone())
                    .or_default();
                ids.push(id);
            }
            let soonest = inner.heap.peek().is_none_or(|Reverse((d, _))| due < *d);
            inner.heap.push(Reverse((due, id)));
            inner.pending.insert(id, pending);
            if !soonest {
                return Ok(());
            }
        }
        drop(inner);
        self.changed.notify_one();
        Ok(())
    }

    /// Records connection `connection_id`'s answer `payload` to the frame `reference` names.
    /// The request completes when its last target answered.
    pub fn reply(
        &self,
        reference: &str,
        connection_id: &str,
        payload: &RawValue,
    ) -> Result<(), ReplyError> {
        let unknown = || ReplyError::UnknownRef(reference.to_owned());
        let id = parse_ref(reference).ok_or_else(unknown)?;
        let size = payload.get().len();
        if size > MAX_ANSWER_BYTES {
            return Err(ReplyError::AnswerTooLarge(size));
        }
        let mut inner = self.lock();
        let pending = inner.pending.get_mut(&id).ok_or_else(unknown)?;
        let at = pending
            .waiting
            .iter()
            .position(|w| &*w.connection_id == connection_id)
            .ok_or_else(unknown)?;
        if pending.answer_bytes + size > MAX_ANSWERS_BYTES {
            return Err(ReplyError::AnswersFull);
        }
        let who = pending.waiting.swap_remove(at);
        pending.answer_bytes += size;
        let connection = who.connection_id.clone();
        pending.answers.push((who, payload.to_owned()));
        let last = pending.waiting.is_empty();
        inner.unindex(&connection, id);
        if !last {
            return Ok(());
        }
        if let Some(done) = inner.finish(id) {
            inner.done.push(done);
        }
        drop(inner);
        self.changed.notify_one();
        Ok(())
    }

    /// The session of connection `connection_id` ended: no request waits for its answer any
    /// more (it is reported missing), and a request left with nobody to wait for completes.
    pub fn ended(&self, connection_id: &str) {
        let mut inner = self.lock();
        let Some(ids) = inner.by_connection.remove(connection_id) else {
            return;
        };
        let mut completed = false;
        for id in ids {
            let Some(pending) = inner.pending.get_mut(&id) else {
                continue;
            };
            if let Some(at) = pending
                .waiting
                .iter()
                .position(|w| &*w.connection_id == connection_id)
            {
                let who = pending.waiting.swap_remove(at);
                pending.gone.push(who);
            }
            if pending.waiting.is_empty()
                && let Some(done) = inner.finish(id)
            {
                inner.done.push(done);
                completed = true;
            }
        }
        drop(inner);
        if completed {
            self.changed.notify_one();
        }
    }

    /// Takes the requests completed by their last answer and those timed out at `now`.
    fn take_completed(&self, now: Instant) -> Vec<Completed> {
        let mut inner = self.lock();
        let mut out = std::mem::take(&mut inner.done);
        while let Some(&Reverse((at, id))) = inner.heap.peek() {
            if at > now {
                break;
            }
            inner.heap.pop();
            if inner.pending.get(&id).is_some_and(|p| p.due == at)
                && let Some(done) = inner.finish(id)
            {
                out.push(done);
            }
        }
        out
    }

    fn next_due(&self) -> Option<Instant> {
        self.lock().heap.peek().map(|Reverse((at, _))| *at)
    }

    /// Waits for completed requests and takes them (for the task that calls the handlers).
    pub async fn next_completed(&self) -> Vec<Completed> {
        crate::timers::next_batch(
            &self.changed,
            |now| self.take_completed(now),
            || self.next_due(),
        )
        .await
    }

    /// How many requests are pending, all plugins together.
    pub fn len(&self) -> usize {
        self.lock().pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn member(n: u32) -> MemberInfo {
        MemberInfo {
            connection_id: format!("c-{n}").into(),
            identity: format!("guest-{n}").into(),
        }
    }

    fn raw(text: &str) -> Box<RawValue> {
        RawValue::from_string(text.to_owned()).unwrap()
    }

    fn outcome(c: &Completed) -> Value {
        serde_json::from_str(&c.outcome).unwrap()
    }

    #[test]
    fn one_answer_completes_a_request_to_one_connection() {
        let requests = Requests::default();
        requests
            .open(
                7,
                "p",
                "done".into(),
                None,
                Targets::Members(vec![member(1)]),
                1000,
            )
            .unwrap();
        assert_eq!(requests.pending("p"), 1);
        assert_eq!(
            requests.reply("h-7", "c-2", &raw("1")),
            Err(ReplyError::UnknownRef("h-7".into())),
            "not a target"
        );
        requests
            .reply("h-7", "c-1", &raw(r#"{"ok":true}"#))
            .unwrap();
        assert_eq!(
            requests.reply("h-7", "c-1", &raw("2")),
            Err(ReplyError::UnknownRef("h-7".into())),
            "answered already"
        );
        let done = requests.take_completed(Instant::now());
        assert_eq!(done.len(), 1);
        assert_eq!((&*done[0].plugin, done[0].handler.as_str()), ("p", "done"));
        assert_eq!(
            outcome(&done[0]),
            json!({"requestId": 7, "room": null, "missing": [],
                   "answers": [{"connectionId": "c-1", "identity": "guest-1", "payload": {"ok": true}}]})
        );
        assert_eq!(requests.pending("p"), 0);
        assert!(requests.take_completed(Instant::now()).is_empty(), "once");
    }

    #[test]
    fn a_room_request_gathers_answers_until_its_timeout() {
        let requests = Requests::default();
        let t0 = Instant::now();
        requests
            .open(
                9,
                "p",
                "done".into(),
                Some("lobby".into()),
                Targets::Members(vec![member(1), member(2), member(3)]),
                50,
            )
            .unwrap();
        requests.reply("h-9", "c-3", &raw("\"c\"")).unwrap();
        requests.reply("h-9", "c-1", &raw("\"a\"")).unwrap();
        assert!(requests.take_completed(Instant::now()).is_empty());
        let done = requests.take_completed(t0 + Duration::from_millis(60));
        assert_eq!(
            outcome(&done[0]),
            json!({"requestId": 9, "room": "lobby",
                   "answers": [{"connectionId": "c-3", "identity": "guest-3", "payload": "c"},
                               {"connectionId": "c-1", "identity": "guest-1", "payload": "a"}],
                   "missing": [{"connectionId": "c-2", "identity": "guest-2"}]})
        );
        assert_eq!(
            requests.reply("h-9", "c-2", &raw("1")),
            Err(ReplyError::UnknownRef("h-9".into())),
            "expired"
        );
    }

    #[test]
    fn a_request_without_targets_completes_at_once() {
        let requests = Requests::default();
        requests
            .open(
                1,
                "p",
                "h".into(),
                Some("empty".into()),
                Targets::Members(vec![]),
                10,
            )
            .unwrap();
        requests
            .open(2, "p", "h".into(), None, Targets::Gone(member(4)), 10)
            .unwrap();
        let done = requests.take_completed(Instant::now());
        assert_eq!(outcome(&done[0])["answers"], json!([]));
        assert_eq!(outcome(&done[0])["missing"], json!([]));
        assert_eq!(outcome(&done[1])["missing"][0]["connectionId"], "c-4");
        assert!(requests.is_empty());
    }

    #[test]
    fn a_target_whose_session_ends_is_missing_at_once() {
        let requests = Requests::default();
        let room = Some("r".to_owned());
        let members = Targets::Members(vec![member(1), member(2)]);
        requests
            .open(5, "p", "h".into(), room, members, 60_000)
            .unwrap();
        requests
            .open(
                6,
                "p",
                "h".into(),
                None,
                Targets::Members(vec![member(2)]),
                60_000,
            )
            .unwrap();
        requests.reply("h-5", "c-1", &raw("1")).unwrap();
        assert!(requests.take_completed(Instant::now()).is_empty());
        requests.ended("c-2");
        let done = requests.take_completed(Instant::now());
        assert_eq!(done.len(), 2, "{done:?}");
        for d in &done {
            assert_eq!(outcome(d)["missing"][0]["connectionId"], "c-2");
        }
        assert_eq!(outcome(&done[0])["answers"][0]["connectionId"], "c-1");
        assert!(requests.is_empty());
        assert!(
            requests.lock().by_connection.is_empty(),
            "no index left behind"
        );
        requests.ended("c-2");
        assert_eq!(
            requests.reply("h-6", "c-2", &raw("1")),
            Err(ReplyError::UnknownRef("h-6".into()))
        );
    }

    #[test]
    fn refs_and_bounds() {
        assert_eq!(parse_ref("h-42"), Some(42));
        for bad in ["42", "h-", "h-x", "c-1", ""] {
            assert_eq!(parse_ref(bad), None, "{bad}");
        }
        let requests = Requests::default();
        assert_eq!(
            requests.reply("h-1", "c-1", &raw("1")),
            Err(ReplyError::UnknownRef("h-1".into()))
        );
        assert_eq!(
            requests.open(
                1,
                "p",
                "h".into(),
                None,
                Targets::Members(vec![member(1)]),
                0
            ),
            Err(RequestError::BadTimeout(0))
        );
        assert_eq!(
            requests.open(
                1,
                "p",
                "h".into(),
                None,
                Targets::Members(vec![member(1)]),
                MAX_REQUEST_TIMEOUT_MS + 1
            ),
            Err(RequestError::BadTimeout(MAX_REQUEST_TIMEOUT_MS + 1))
        );
        for id in 0..MAX_REQUESTS_PER_PLUGIN as u64 {
            requests
                .open(
                    id,
                    "p",
                    "h".into(),
                    None,
                    Targets::Members(vec![member(1)]),
                    1000,
                )
                .unwrap();
        }
        assert_eq!(
            requests.open(
                u64::MAX,
                "p",
                "h".into(),
                None,
                Targets::Members(vec![member(1)]),
                1000
            ),
            Err(RequestError::TooMany("p".into()))
        );
        let big = format!("\"{}\"", "x".repeat(MAX_ANSWER_BYTES));
        assert_eq!(
            requests.reply("h-0", "c-1", &raw(&big)),
            Err(ReplyError::AnswerTooLarge(big.len()))
        );
    }

    #[tokio::test]
    async fn the_driver_wakes_for_an_answer() {
        let requests = Arc::new(Requests::default());
        requests
            .open(
                3,
                "p",
                "h".into(),
                None,
                Targets::Members(vec![member(1)]),
                60_000,
            )
            .unwrap();
        let waiter = {
            let requests = requests.clone();
            tokio::spawn(async move { requests.next_completed().await })
        };
        tokio::task::yield_now().await;
        requests.reply("h-3", "c-1", &raw("true")).unwrap();
        let done = tokio::time::timeout(Duration::from_secs(20), waiter)
            .await
            .expect("woken by the answer, long before the timeout")
            .unwrap();
        assert_eq!(done[0].id, 3);
    }
}
