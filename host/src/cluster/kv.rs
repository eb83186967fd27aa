//! The plugins' key-value stores in a cluster: the data lives in Redis, every node keeps a full
//! replica of each plugin's store (plugin calls read it, with no I/O), and a call's writes
//! commit through one Lua script that checks the versions the call read and applies its writes
//! atomically ([`crate::kv`] says what a commit is).
//!
//! Keys, for a plugin `P`: `plexus:kv:P:v` (hash: key → value), `plexus:kv:P:n` (hash: key →
//! version, the number of the commit that wrote it), `plexus:kv:P:seq` (the number of the
//! plugin's last commit); the channel `plexus:kv:P` carries each commit's writes, as the JSON
//! array `[number, "s", key, value, "d", key, ...]`. A node follows every plugin's channel
//! (`PSUBSCRIBE plexus:kv:*`), loads a plugin's replica when it starts serving the plugin and
//! after every reconnection, and loads it again when a commit number skips ahead (Redis pub/sub
//! is at most once).

use std::collections::HashMap;
use std::sync::Arc;

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use redis::{RedisResult, Script};
use tokio::sync::{mpsc, watch};

use super::Shared;
use super::link::{Backoff, CONNECT_TIMEOUT};
use crate::kv::{ABSENT, Committed, Current, KvBackend, KvStore, Reads, Ticket, Write};

/// How long a call that conflicted holds the keys it read: its next attempt comes well
/// within it, and a call that never comes back (its node died) blocks them no longer.
const HOLD_MS: u64 = 20;

/// Commits one call's key-value work. ARGV: plugin, the call's ticket, its priority (empty
/// until it conflicted), the hold in ms, the number of keys read, then each key read and the
/// version seen, then each write: `s`, key, value or `d`, key.
///
/// A key read conflicts when its version changed, or when another call holds it (a hold, in
/// the hash `plexus:kv:P:h`, is `ticket priority until`, times in µs of Redis's clock). On a
/// conflict it writes nothing: the call gets a priority (now, if it had none) and holds every
/// key it read that is free, or held by a younger call; it returns `0`, the plugin's last commit
/// number, the call's priority, `1` when it holds every key it read (else `0`), `1` when a
/// version changed (else `0`: only held by others), then the key, its value (empty when
/// absent) and version (`0` when absent) of each conflicting key. Otherwise it applies the writes under the next commit
/// number, lets go of the call's holds, publishes the writes and returns `1` and that number.
const COMMIT: &str = r"
local base = 'plexus:kv:' .. ARGV[1]
local values, versions, seq_key, holds = base .. ':v', base .. ':n', base .. ':seq', base .. ':h'
local ticket, priority, hold_us = ARGV[2], ARGV[3], tonumber(ARGV[4]) * 1000
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local function hold_of(key)
  local h = redis.call('HGET', holds, key)
  if not h then return nil end
  local a = string.find(h, ' ', 1, true)
  local b = string.find(h, ' ', a + 1, true)
  local held = {ticket = string.sub(h, 1, a - 1), priority = tonumber(string.sub(h, a + 1, b - 1)), till = tonumber(string.sub(h, b + 1))}
  if held.till <= now then
    redis.call('HDEL', holds, key)
    return nil
  end
  return held
end
local reads = tonumber(ARGV[5])
local stale, read_keys, changed = {}, {}, '0'
local i = 6
for _ = 1, reads do
  local key, seen = ARGV[i], ARGV[i + 1]
  table.insert(read_keys, key)
  local version = redis.call('HGET', versions, key) or '0'
  local held = hold_of(key)
  if version ~= seen then changed = '1' end
  if version ~= seen or (held and held.ticket ~= ticket) then
    table.insert(stale, key)
    table.insert(stale, redis.call('HGET', values, key) or '')
    table.insert(stale, version)
  end
  i = i + 2
end
if #stale > 0 then
  if priority == '' then priority = string.format('%.0f', now) end
  local mine = tonumber(priority)
  local hold = ticket .. ' ' .. priority .. ' ' .. string.format('%.0f', now + hold_us)
  local holds_all = '1'
  for _, key in ipairs(read_keys) do
    local held = hold_of(key)
    if not held or held.ticket == ticket or mine < held.priority then
      redis.call('HSET', holds, key, hold)
    else
      holds_all = '0'
    end
  end
  local result = {'0', redis.call('GET', seq_key) or '0', priority, holds_all, changed}
  for _, s in ipairs(stale) do table.insert(result, s) end
  return result
end
for _, key in ipairs(read_keys) do
  local held = hold_of(key)
  if held and held.ticket == ticket then redis.call('HDEL', holds, key) end
end
local seq = redis.call('INCR', seq_key)
local message = {tostring(seq)}
while i <= #ARGV do
  local op, key = ARGV[i], ARGV[i + 1]
  if op == 's' then
    redis.call('HSET', values, key, ARGV[i + 2])
    redis.call('HSET', versions, key, seq)
    table.insert(message, 's')
    table.insert(message, key)
    table.insert(message, ARGV[i + 2])
    i = i + 3
  else
    redis.call('HDEL', values, key)
    redis.call('HDEL', versions, key)
    table.insert(message, 'd')
    table.insert(message, key)
    i = i + 2
  end
end
redis.call('PUBLISH', base, cjson.encode(message))
return {'1', tostring(seq)}
";

/// Lets go of a call's holds. ARGV: plugin, ticket, then the keys.
const RELEASE: &str = r"
local holds = 'plexus:kv:' .. ARGV[1] .. ':h'
local prefix = ARGV[2] .. ' '
for i = 3, #ARGV do
  local h = redis.call('HGET', holds, ARGV[i])
  if h and string.sub(h, 1, #prefix) == prefix then redis.call('HDEL', holds, ARGV[i]) end
end
return 0
";

/// A plugin's whole store, at one commit number. ARGV: plugin. Returns the number, the values
/// hash and the versions hash.
const SNAPSHOT: &str = r"
local base = 'plexus:kv:' .. ARGV[1]
return {redis.call('GET', base .. ':seq') or '0', redis.call('HGETALL', base .. ':v'), redis.call('HGETALL', base .. ':n')}
";

/// The channel of a plugin's commits.
fn channel_of(plugin: &str) -> String {
    format!("plexus:kv:{plugin}")
}

/// The cluster's side of the plugins' stores: commits, and the task keeping replicas current.
#[derive(Debug)]
pub struct ClusterKv {
    shared: Arc<Shared>,
    scripts: Arc<KvScripts>,
    track: mpsc::UnboundedSender<Arc<KvStore>>,
}

struct KvScripts {
    commit: Script,
    release: Script,
    snapshot: Script,
}

impl std::fmt::Debug for KvScripts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvScripts").finish_non_exhaustive()
    }
}

impl ClusterKv {
    /// Starts the replica task.
    pub(super) fn start(shared: Arc<Shared>, shutdown: watch::Receiver<bool>) -> Arc<ClusterKv> {
        let scripts = Arc::new(KvScripts {
            commit: Script::new(COMMIT),
            release: Script::new(RELEASE),
            snapshot: Script::new(SNAPSHOT),
        });
        let (track, tracked) = mpsc::unbounded_channel();
        tokio::spawn(run(shared.clone(), scripts.clone(), tracked, shutdown));
        Arc::new(ClusterKv {
            shared,
            scripts,
            track,
        })
    }
}

impl KvBackend for ClusterKv {
    fn commit(
        &self,
        plugin: &str,
        ticket: &Ticket,
        reads: Reads,
        writes: &[Write],
    ) -> BoxFuture<'static, Result<Committed, String>> {
        let mut args: Vec<String> = Vec::with_capacity(5 + 2 * reads.len() + 3 * writes.len());
        args.push(plugin.to_owned());
        args.push(ticket.id.to_string());
        args.push(ticket.priority.clone().unwrap_or_default());
        args.push(HOLD_MS.to_string());
        args.push(reads.len().to_string());
        for (key, version) in reads {
            args.push(key);
            args.push(version.to_string());
        }
        for write in writes {
            match write {
                Write::Set { key, value } => {
                    args.extend(["s".to_owned(), key.clone(), value.clone()]);
                }
                Write::Delete { key } => args.extend(["d".to_owned(), key.clone()]),
            }
        }
        let (shared, scripts) = (self.shared.clone(), self.scripts.clone());
        Box::pin(async move {
            let result: RedisResult<Vec<String>> = async {
                let mut conn = shared.link.get().await?;
                let mut invocation = scripts.commit.prepare_invoke();
                for arg in &args {
                    invocation.arg(arg);
                }
                invocation.invoke_async(&mut conn).await
            }
            .await;
            shared.link.outcome(&result).await;
            let answer = result.map_err(|e| e.to_string())?;
            parse_commit(&answer).ok_or_else(|| format!("an unexpected answer {answer:?}"))
        })
    }

    fn release(&self, plugin: &str, ticket: &Ticket) {
        let mut args = vec![plugin.to_owned(), ticket.id.to_string()];
        args.extend(ticket.held.iter().cloned());
        let (shared, scripts) = (self.shared.clone(), self.scripts.clone());
        tokio::spawn(async move {
            let result: RedisResult<i64> = async {
                let mut conn = shared.link.get().await?;
                let mut invocation = scripts.release.prepare_invoke();
                for arg in &args {
                    invocation.arg(arg);
                }
                invocation.invoke_async(&mut conn).await
            }
            .await;
            // Not let go: the holds end by themselves within `HOLD_MS`.
            shared.link.outcome(&result).await;
        });
    }

    fn track(&self, store: &Arc<KvStore>) {
        let _ = self.track.send(store.clone());
    }
}

/// Reads the commit script's answer.
fn parse_commit(answer: &[String]) -> Option<Committed> {
    let number = answer.get(1)?.parse::<u64>().ok()?;
    match answer.first()?.as_str() {
        "1" => Some(Committed::Done(number)),
        "0" => {
            let priority = answer.get(2)?.clone();
            let holds = answer.get(3)? == "1";
            let changed = answer.get(4)? == "1";
            let current = answer[5..]
                .chunks_exact(3)
                .map(|c| {
                    let version = c[2].parse::<u64>().ok()?;
                    Some(Current {
                        key: c[0].clone(),
                        value: (version != ABSENT).then(|| c[1].clone()),
                        version,
                    })
                })
                .collect::<Option<Vec<_>>>()?;
            Some(Committed::Conflict {
                current,
                as_of: number,
                priority,
                holds,
                changed,
            })
        }
        _ => None,
    }
}

/// Reads a commit's publication: its number and its writes.
fn parse_publication(text: &str) -> Option<(u64, Vec<Write>)> {
    let parts: Vec<String> = serde_json::from_str(text).ok()?;
    let number = parts.first()?.parse::<u64>().ok()?;
    let mut writes = Vec::new();
    let mut rest = &parts[1..];
    while let Some(op) = rest.first() {
        match (op.as_str(), rest.get(1), rest.get(2)) {
            ("s", Some(key), Some(value)) => {
                writes.push(Write::Set {
                    key: key.clone(),
                    value: value.clone(),
                });
                rest = &rest[3..];
            }
            ("d", Some(key), _) => {
                writes.push(Write::Delete { key: key.clone() });
                rest = &rest[2..];
            }
            _ => return None,
        }
    }
    Some((number, writes))
}

/// Loads a plugin's replica from Redis.
async fn load(shared: &Shared, scripts: &KvScripts, store: &KvStore) -> RedisResult<()> {
    let result: RedisResult<(String, Vec<String>, Vec<String>)> = async {
        let mut conn = shared.link.get().await?;
        scripts
            .snapshot
            .arg(store.plugin())
            .invoke_async(&mut conn)
            .await
    }
    .await;
    shared.link.outcome(&result).await;
    let (number, values, versions) = result?;
    let versions: HashMap<&str, u64> = versions
        .chunks_exact(2)
        .filter_map(|p| Some((p[0].as_str(), p[1].parse().ok()?)))
        .collect();
    let entries = values
        .chunks_exact(2)
        .map(|p| Current {
            version: versions.get(p[0].as_str()).copied().unwrap_or(1),
            key: p[0].clone(),
            value: Some(p[1].clone()),
        })
        .collect();
    let number = number.parse().unwrap_or(0);
    store.load(entries, number);
    tracing::debug!(
        plugin = store.plugin(),
        number,
        "cluster: key-value replica loaded"
    );
    Ok(())
}

/// The replica task: follows every plugin's commits, and loads each replica when it is first
/// tracked, after every reconnection and after a missed commit.
async fn run(
    shared: Arc<Shared>,
    scripts: Arc<KvScripts>,
    mut tracked: mpsc::UnboundedReceiver<Arc<KvStore>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut stores: HashMap<Arc<str>, Arc<KvStore>> = HashMap::new();
    let mut backoff = Backoff::default();
    loop {
        let connected =
            tokio::time::timeout(CONNECT_TIMEOUT, shared.link.client.get_async_pubsub()).await;
        if let Ok(Ok(pubsub)) = connected {
            let (mut sink, mut stream) = pubsub.split();
            let synced = async {
                sink.psubscribe(channel_of("*")).await?;
                for store in stores.values() {
                    load(&shared, &scripts, store).await?;
                }
                RedisResult::Ok(())
            }
            .await;
            match synced {
                Ok(()) => {
                    backoff.reset();
                    let outcome: RedisResult<()> = loop {
                        tokio::select! {
                            store = tracked.recv() => match store {
                                Some(store) => {
                                    let plugin: Arc<str> = Arc::from(store.plugin());
                                    stores.insert(plugin, store.clone());
                                    if let Err(e) = load(&shared, &scripts, &store).await {
                                        break Err(e);
                                    }
                                }
                                None => return,
                            },
                            message = stream.next() => match message {
                                Some(message) => {
                                    if let Err(e) = follow(&shared, &scripts, &stores, &message).await {
                                        break Err(e);
                                    }
                                }
                                None => break Err(redis::RedisError::from((
                                    redis::ErrorKind::Io,
                                    "the subscription connection closed",
                                ))),
                            },
                            () = crate::server::stopped(&mut shutdown) => return,
                        }
                    };
                    if let Err(e) = outcome {
                        tracing::warn!(
                            "cluster: key-value replicas lost their feed, loading them again: {e}"
                        );
                    }
                }
                Err(e) => tracing::debug!("cluster: key-value replicas not loaded: {e}"),
            }
        }
        // Until Redis answers again: remember the stores to load.
        let wait = tokio::time::sleep(backoff.next());
        tokio::pin!(wait);
        loop {
            tokio::select! {
                () = &mut wait => break,
                store = tracked.recv() => match store {
                    Some(store) => {
                        stores.insert(Arc::from(store.plugin()), store);
                    }
                    None => return,
                },
                () = crate::server::stopped(&mut shutdown) => return,
            }
        }
    }
}

/// Applies one commit's publication to its plugin's replica; loads the replica again when
/// commits before it were missed.
async fn follow(
    shared: &Shared,
    scripts: &KvScripts,
    stores: &HashMap<Arc<str>, Arc<KvStore>>,
    message: &redis::Msg,
) -> RedisResult<()> {
    let Some(plugin) = message.get_channel_name().strip_prefix("plexus:kv:") else {
        return Ok(());
    };
    let Some(store) = stores.get(plugin) else {
        // A plugin this node does not serve.
        return Ok(());
    };
    let parsed = std::str::from_utf8(message.get_payload_bytes())
        .ok()
        .and_then(parse_publication);
    let Some((number, writes)) = parsed else {
        tracing::warn!(
            plugin,
            "cluster: a key-value publication that does not parse, dropped"
        );
        return Ok(());
    };
    if !store.apply(number, &writes, true) {
        tracing::info!(
            plugin,
            number,
            "cluster: key-value commits missed; loading the replica again"
        );
        load(shared, scripts, store).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publications_and_answers_parse() {
        let (n, writes) = parse_publication(r#"["7","s","a","1","d","b","s","c",""]"#).unwrap();
        assert_eq!(n, 7);
        assert_eq!(
            writes,
            vec![
                Write::Set {
                    key: "a".into(),
                    value: "1".into()
                },
                Write::Delete { key: "b".into() },
                Write::Set {
                    key: "c".into(),
                    value: String::new()
                },
            ]
        );
        assert!(parse_publication(r#"["7","s","a"]"#).is_none());
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(matches!(
            parse_commit(&s(&["1", "9"])),
            Some(Committed::Done(9))
        ));
        let Some(Committed::Conflict {
            current,
            as_of,
            priority,
            holds,
            changed,
        }) = parse_commit(&s(&["0", "9", "17", "1", "1", "a", "", "0", "b", "x", "4"]))
        else {
            panic!("a conflict")
        };
        assert_eq!(
            (as_of, priority.as_str(), holds, changed),
            (9, "17", true, true)
        );
        assert_eq!(current[0].value, None);
        assert_eq!(current[1].value.as_deref(), Some("x"));
        assert_eq!(current[1].version, 4);
    }
}
