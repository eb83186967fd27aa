//! Plugin key-value stores and their commits: each plugin's store holds every key with the
//! version that last wrote it, so that a call's key-value work commits only if nothing it read
//! changed meanwhile (optimistic concurrency; the router runs a conflicting call again). On one
//! node the store is the data and commits here; in a cluster it is this node's replica of the
//! data in Redis, and a [`KvBackend`] (the cluster, `cluster/kv.rs`) commits and keeps it current.
//!
//! Plugin calls only read the store (no I/O); their writes are effects, committed after the call.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use dashmap::DashMap;
use futures_util::future::BoxFuture;

use crate::effects::Effect;

/// The version of an absent key.
pub const ABSENT: u64 = 0;

/// The keys a call read, each with the version it saw (its first read of that key).
pub type Reads = Vec<(String, u64)>;

/// One write of a call, in the order it made them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    Set { key: String, value: String },
    Delete { key: String },
}

impl Write {
    pub fn key(&self) -> &str {
        match self {
            Write::Set { key, .. } | Write::Delete { key } => key,
        }
    }

    /// The value written (`None`: deleted).
    pub fn value(&self) -> Option<&str> {
        match self {
            Write::Set { value, .. } => Some(value),
            Write::Delete { .. } => None,
        }
    }
}

/// Takes a call's key-value writes out of its effects, in order.
pub fn take_writes(effects: &mut Vec<Effect>) -> Vec<Write> {
    if !effects
        .iter()
        .any(|e| matches!(e, Effect::KvSet { .. } | Effect::KvDelete { .. }))
    {
        return Vec::new();
    }
    effects
        .extract_if(.., |e| {
            matches!(e, Effect::KvSet { .. } | Effect::KvDelete { .. })
        })
        .filter_map(|e| match e {
            Effect::KvSet { key, value } => Some(Write::Set { key, value }),
            Effect::KvDelete { key } => Some(Write::Delete { key }),
            _ => None,
        })
        .collect()
}

/// Why a call's key-value work did not commit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommitError {
    /// A key the call read changed since: the call must run again.
    #[error("a key the call read changed since")]
    Conflict,
    /// This node's replica already shows a newer version of a key the call read (another
    /// call of this node committed it first): the call must run again, and no round trip to
    /// the shared store was spent on it.
    #[error("a key the call read changed since, in this node's replica")]
    Stale,
    /// An older call of another node holds a key the call read, which did not change: the
    /// call must wait a moment and run again.
    #[error("an older call holds a key the call read")]
    Held,
    /// The cluster's store could not be reached; nothing was written.
    #[error("the key-value store is unreachable: {0}")]
    Unavailable(String),
}

/// The current value and version of a key (`None`, [`ABSENT`]: there is none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Current {
    pub key: String,
    pub value: Option<String>,
    pub version: u64,
}

/// What the shared store answered to a commit.
#[derive(Debug)]
pub enum Committed {
    /// The writes are in, under this version.
    Done(u64),
    /// Keys read had changed (or another call holds them): their current values, as of the
    /// store's version `as_of`, and the priority the call has from now on.
    Conflict {
        current: Vec<Current>,
        as_of: u64,
        priority: String,
        /// Whether the call now holds every key it read (its next attempt should come at once).
        holds: bool,
        /// Whether a key read has another version (else they are only held by older calls).
        changed: bool,
    },
}

/// One call's standing across its attempts, in a cluster. A call whose commit conflicted gets
/// a priority (the shared store's time of that first conflict) and holds the keys it read for
/// a moment: the calls of other nodes that read them conflict until it committed, unless
/// they are older. The oldest contending call wins, so a call loses only to older ones.
#[derive(Debug, Default)]
pub struct Ticket {
    /// Names the call in the shared store (0 until its first commit there).
    pub id: u64,
    /// Its priority, once it conflicted.
    pub priority: Option<String>,
    /// The keys it may hold (those it read when it last conflicted).
    pub held: Vec<String>,
    /// Whether it holds all of them: its next attempt should not wait.
    pub holds_all: bool,
}

/// A store shared by several nodes (the cluster), which commits and keeps replicas current.
pub trait KvBackend: Send + Sync + fmt::Debug {
    /// Commits `writes` of plugin `plugin` if every key of `reads` still has the version read
    /// and no older call holds it.
    fn commit(
        &self,
        plugin: &str,
        ticket: &Ticket,
        reads: Reads,
        writes: &[Write],
    ) -> BoxFuture<'static, Result<Committed, String>>;

    /// Lets go of the keys a call holds, without waiting for the answer (the call ended
    /// without committing through the shared store).
    fn release(&self, plugin: &str, ticket: &Ticket);

    /// Starts keeping `store` (a replica) current: loads it and follows its changes.
    fn track(&self, store: &Arc<KvStore>);
}

/// One key of a store. A tombstone (`value: None`) remembers a delete of a replica until the
/// changes before it have all arrived, so that a late one cannot bring the key back.
#[derive(Debug, Clone)]
struct Entry {
    value: Option<String>,
    version: u64,
}

/// A plugin's key-value store (shared by all its versions).
pub struct KvStore {
    plugin: Arc<str>,
    entries: DashMap<String, Entry>,
    /// Held for writing while a commit or a change of several keys applies, and for reading
    /// while a call that wrote nothing checks its reads: a call never sees half a commit.
    gate: RwLock<()>,
    /// One node: the last version given. A replica: every change up to this version is in it.
    seq: AtomicU64,
    /// The shared store, when this one is a replica of it.
    backend: OnceLock<Arc<dyn KvBackend>>,
    /// A replica: the keys this node's commits in flight read or write (with how many), and
    /// the signal that one ended. A call that read a key in flight waits for that commit's
    /// outcome instead of sending a commit that would conflict with it.
    in_flight: std::sync::Mutex<std::collections::HashMap<String, u32>>,
    landed: tokio::sync::Notify,
}

impl fmt::Debug for KvStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KvStore")
            .field("plugin", &self.plugin)
            .field("keys", &self.len())
            .finish_non_exhaustive()
    }
}

impl KvStore {
    pub fn new(plugin: &str) -> KvStore {
        KvStore {
            plugin: Arc::from(plugin),
            entries: DashMap::new(),
            gate: RwLock::new(()),
            seq: AtomicU64::new(0),
            backend: OnceLock::new(),
            in_flight: Default::default(),
            landed: tokio::sync::Notify::new(),
        }
    }

    /// The plugin this store belongs to.
    pub fn plugin(&self) -> &str {
        &self.plugin
    }

    /// Makes this store a replica of `backend`'s (once).
    pub fn set_backend(&self, backend: Arc<dyn KvBackend>) -> bool {
        self.backend.set(backend).is_ok()
    }

    /// The value under `key` and its version ([`ABSENT`] when there is none).
    pub fn read(&self, key: &str) -> (Option<String>, u64) {
        match self.entries.get(key) {
            Some(e) if e.value.is_some() => (e.value.clone(), e.version),
            _ => (None, ABSENT),
        }
    }

    /// The value under `key`.
    pub fn get(&self, key: &str) -> Option<String> {
        self.read(key).0
    }

    /// How many keys hold a value.
    pub fn len(&self) -> usize {
        self.entries.iter().filter(|e| e.value.is_some()).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn version(&self, key: &str) -> u64 {
        self.read(key).1
    }

    fn unchanged(&self, reads: &[(String, u64)]) -> bool {
        reads.iter().all(|(key, seen)| self.version(key) == *seen)
    }

    /// Commits a call's key-value work: its writes, if no key of `reads` changed since it was
    /// read. A call that wrote nothing only checks that what it read is still current here (it
    /// saw one consistent state of this store; a replica may be a few ms behind the cluster).
    pub async fn commit(
        &self,
        reads: Reads,
        writes: Vec<Write>,
        ticket: &mut Ticket,
    ) -> Result<(), CommitError> {
        if writes.is_empty() {
            if reads.is_empty() {
                return Ok(());
            }
            let _gate = self.gate.read().unwrap_or_else(|e| e.into_inner());
            return if self.unchanged(&reads) {
                Ok(())
            } else {
                Err(CommitError::Conflict)
            };
        }
        let Some(backend) = self.backend.get() else {
            return self.commit_here(&reads, writes);
        };
        let _claim = self.claim(&reads, &writes).await;
        // What changed here already needs no round trip to find out.
        if !self.unchanged(&reads) {
            return Err(CommitError::Stale);
        }
        if ticket.id == 0 {
            ticket.id = rand::random::<u64>() | 1;
        }
        let keys: Vec<String> = reads.iter().map(|(key, _)| key.clone()).collect();
        match backend.commit(&self.plugin, ticket, reads, &writes).await {
            Ok(Committed::Done(version)) => {
                ticket.held.clear();
                ticket.holds_all = false;
                self.apply(version, &writes, false);
                Ok(())
            }
            Ok(Committed::Conflict {
                current,
                as_of,
                priority,
                holds,
                changed,
            }) => {
                tracing::trace!(plugin = %self.plugin, ticket = ticket.id, %priority, holds, changed, ?keys, ?current, "kv: a commit conflicted");
                ticket.priority = Some(priority);
                ticket.held = keys;
                ticket.holds_all = holds;
                self.refresh(current, as_of);
                Err(if changed {
                    CommitError::Conflict
                } else {
                    CommitError::Held
                })
            }
            Err(reason) => Err(CommitError::Unavailable(reason)),
        }
    }

    /// Ends a call's attempts: lets go of the keys it holds, if it holds any.
    pub fn finish(&self, ticket: Ticket) {
        if !ticket.held.is_empty()
            && let Some(backend) = self.backend.get()
        {
            backend.release(&self.plugin, &ticket);
        }
    }

    /// Waits until no commit of this node in flight touches a key of `reads`, then marks the
    /// keys of `reads` and `writes` in flight until the returned claim is dropped.
    async fn claim<'a>(&'a self, reads: &[(String, u64)], writes: &[Write]) -> Claim<'a> {
        loop {
            let landed = self.landed.notified();
            tokio::pin!(landed);
            landed.as_mut().enable();
            {
                let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
                if !reads.iter().any(|(key, _)| in_flight.contains_key(key)) {
                    let keys: Vec<String> = reads
                        .iter()
                        .map(|(key, _)| key.clone())
                        .chain(writes.iter().map(|w| w.key().to_owned()))
                        .collect();
                    for key in &keys {
                        *in_flight.entry(key.clone()).or_default() += 1;
                    }
                    return Claim { store: self, keys };
                }
            }
            landed.await;
        }
    }

    /// One node: checks and applies under the gate, with the next version.
    fn commit_here(&self, reads: &[(String, u64)], writes: Vec<Write>) -> Result<(), CommitError> {
        let _gate = self.gate.write().unwrap_or_else(|e| e.into_inner());
        if !self.unchanged(reads) {
            return Err(CommitError::Conflict);
        }
        let version = self.seq.fetch_add(1, Ordering::AcqRel) + 1;
        for write in writes {
            match write {
                Write::Set { key, value } => {
                    self.entries.insert(
                        key,
                        Entry {
                            value: Some(value),
                            version,
                        },
                    );
                }
                Write::Delete { key } => {
                    self.entries.remove(&key);
                }
            }
        }
        Ok(())
    }

    /// Writes a value from outside any plugin call (administration, tests), as a commit.
    pub fn insert(&self, key: String, value: String) {
        // Without a backend the commit is synchronous and reads nothing: it cannot fail.
        let _ = self.commit_here(&[], vec![Write::Set { key, value }]);
    }

    // ---- a replica: changes that come from the shared store ----

    /// Applies one key's change of version `version`, unless the replica holds a later one.
    fn change(&self, key: &str, value: Option<&str>, version: u64, floor: u64) {
        match self.entries.get_mut(key) {
            Some(mut e) => {
                if e.version < version {
                    *e = Entry {
                        value: value.map(str::to_owned),
                        version,
                    };
                }
            }
            // A change the replica already went past (the key was deleted after it).
            None if version <= floor => {}
            None => {
                self.entries.insert(
                    key.to_owned(),
                    Entry {
                        value: value.map(str::to_owned),
                        version,
                    },
                );
            }
        }
    }

    /// Applies the writes of commit `version`. `in_order`: it is the commit after every one
    /// applied so far (the channel's next), which lets the replica forget the deletes in it.
    /// Returns false when commits before it are missing (the replica must be loaded again).
    pub fn apply(&self, version: u64, writes: &[Write], in_order: bool) -> bool {
        let _gate = self.gate.write().unwrap_or_else(|e| e.into_inner());
        let floor = self.seq.load(Ordering::Acquire);
        if in_order && version <= floor {
            return true;
        }
        for write in writes {
            self.change(write.key(), write.value(), version, floor);
        }
        if !in_order {
            return true;
        }
        if version == floor + 1 {
            self.seq.store(version, Ordering::Release);
            for write in writes {
                if let Write::Delete { key } = write {
                    self.entries
                        .remove_if(key, |_, e| e.value.is_none() && e.version <= version);
                }
            }
            true
        } else {
            false
        }
    }

    /// Applies the current values of some keys, as of the shared store's version `as_of`.
    pub fn refresh(&self, current: Vec<Current>, as_of: u64) {
        let _gate = self.gate.write().unwrap_or_else(|e| e.into_inner());
        let floor = self.seq.load(Ordering::Acquire);
        for c in current {
            // An absent key is known absent as of `as_of`.
            let version = if c.value.is_some() { c.version } else { as_of };
            self.change(&c.key, c.value.as_deref(), version, floor);
        }
    }

    /// Loads the whole store as of the shared store's version `as_of` (every key with its value
    /// and version). Changes the replica holds from after it stay.
    pub fn load(&self, entries: Vec<Current>, as_of: u64) {
        let _gate = self.gate.write().unwrap_or_else(|e| e.into_inner());
        if as_of < self.seq.load(Ordering::Acquire) {
            // The shared store was lost and begun again (Redis restarted without its data).
            self.entries.clear();
            self.seq.store(0, Ordering::Release);
        }
        let mut present = std::collections::HashSet::with_capacity(entries.len());
        for c in entries {
            // The snapshot is the truth as of `as_of`: only later changes held here win.
            self.change(&c.key, c.value.as_deref(), c.version, 0);
            present.insert(c.key);
        }
        // Deleted by `as_of`, or tombstones it went past.
        self.entries
            .retain(|key, e| e.version > as_of || (e.value.is_some() && present.contains(key)));
        self.seq.fetch_max(as_of, Ordering::AcqRel);
    }
}

/// Keys of a commit in flight (see [`KvStore::claim`]); released when dropped.
struct Claim<'a> {
    store: &'a KvStore,
    keys: Vec<String>,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut in_flight = self
            .store
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for key in self.keys.drain(..) {
            if let Some(n) = in_flight.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    in_flight.remove(&key);
                }
            }
        }
        drop(in_flight);
        self.store.landed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(key: &str, value: &str) -> Write {
        Write::Set {
            key: key.into(),
            value: value.into(),
        }
    }

    fn del(key: &str) -> Write {
        Write::Delete { key: key.into() }
    }

    impl KvStore {
        async fn commit_once(&self, reads: Reads, writes: Vec<Write>) -> Result<(), CommitError> {
            self.commit(reads, writes, &mut Ticket::default()).await
        }
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn one_node_commits_only_when_nothing_read_changed() {
        let store = KvStore::new("p");
        assert_eq!(store.read("n"), (None, ABSENT));
        block_on(store.commit_once(vec![("n".into(), ABSENT)], vec![set("n", "1")])).unwrap();
        let (value, version) = store.read("n");
        assert_eq!(value.as_deref(), Some("1"));
        assert!(version > ABSENT);
        // A second call that read `n` absent conflicts.
        assert_eq!(
            block_on(store.commit_once(vec![("n".into(), ABSENT)], vec![set("n", "9")])),
            Err(CommitError::Conflict)
        );
        assert_eq!(store.get("n").as_deref(), Some("1"));
        // Read-only calls check too, and blind writes always commit.
        assert_eq!(
            block_on(store.commit_once(vec![("n".into(), ABSENT)], vec![])),
            Err(CommitError::Conflict)
        );
        block_on(store.commit_once(vec![("n".into(), version)], vec![])).unwrap();
        block_on(store.commit_once(vec![], vec![del("n")])).unwrap();
        assert!(store.is_empty());
    }

    #[test]
    fn a_replica_keeps_the_latest_version_of_each_key() {
        let store = KvStore::new("p");
        store.load(
            vec![Current {
                key: "a".into(),
                value: Some("1".into()),
                version: 3,
            }],
            5,
        );
        assert_eq!(store.read("a"), (Some("1".into()), 3));
        // Commit 7 arrives (out of order: 6 is missing) then the late 6.
        assert!(!store.apply(7, &[del("a")], true));
        assert_eq!(store.read("a"), (None, ABSENT));
        assert!(store.apply(6, &[set("a", "2")], true));
        assert_eq!(
            store.read("a"),
            (None, ABSENT),
            "a late change brings nothing back"
        );
        assert!(store.apply(7, &[del("a")], true));
        // A reload as of 8 without `a`: the tombstone goes, and stale changes stay out.
        store.load(vec![], 8);
        assert!(store.entries.is_empty());
        assert!(store.apply(5, &[set("a", "old")], false));
        assert_eq!(store.read("a"), (None, ABSENT));
        // A conflict's answer: current values as of a version.
        store.refresh(
            vec![Current {
                key: "b".into(),
                value: Some("x".into()),
                version: 9,
            }],
            9,
        );
        assert_eq!(store.read("b"), (Some("x".into()), 9));
    }

    #[test]
    fn take_writes_keeps_the_other_effects_in_order() {
        let mut effects = vec![
            Effect::Reply {
                ty: "a".into(),
                payload: "1".into(),
            },
            Effect::KvSet {
                key: "k".into(),
                value: "v".into(),
            },
            Effect::KvDelete { key: "j".into() },
            Effect::Join { room: "r".into() },
        ];
        assert_eq!(take_writes(&mut effects), vec![set("k", "v"), del("j")]);
        assert_eq!(effects.len(), 2);
        assert!(matches!(effects[1], Effect::Join { .. }));
    }
}
