//! The Lua scripts the cluster runs in Redis. Each is atomic: a room's offset, its stream, its
//! member hash and the relay to the subscribed nodes change together, so that the stream holds
//! exactly what was relayed, in the order of its offsets.
//!
//! Keys, for a room `R`: `plexus:r:R` (hash: `epoch`, `offset`), `plexus:r:R:s` (the stream of
//! the room's last publications, entry ids `0-<offset>`), `plexus:r:R:m` (hash: connection id →
//! node and identity), `plexus:r:R:p` (hash: identity → how many nodes it is online on); the
//! channel `plexus:r:R`. For a node `N`: `plexus:n:N:rooms` (the rooms it had members in),
//! `plexus:n:N:p` (the room and identity of everyone online on it), the channel `plexus:n:N`
//! (direct frames), `plexus:n:N:s` (its sessions). For a session `S` with connection id `C`:
//! `plexus:s:S` (hash: `cid`, `identity`, `token` (its SHA-256), `node`), `plexus:s:S:j` (the
//! journal of its frames, entry ids `0-<seq>`), `plexus:c:C` (hash: room → the offset it joined
//! at); `plexus:moved`: connection id → the node its session moved to. `plexus:status`: each identity's presence status. `plexus:nodes`: every live
//! node, scored by when its lease ends (Redis time, in ms).

use redis::Script;

/// Appends a publication to a room's stream with the next offset (a new stream gets the
/// candidate epoch) and relays it, prefixed with the epoch and offset, to the room's channel.
const PUBLISH_FN: &str = r"
local function publish(room, payload, epoch_candidate, maxlen, ttl)
  local meta = 'plexus:r:' .. room
  local stream = meta .. ':s'
  local epoch = redis.call('HGET', meta, 'epoch')
  if not epoch then
    epoch = epoch_candidate
    redis.call('HSET', meta, 'epoch', epoch)
  end
  local offset = redis.call('HINCRBY', meta, 'offset', 1)
  redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '0-' .. offset, 'd', payload)
  redis.call('EXPIRE', meta, ttl)
  redis.call('EXPIRE', stream, ttl)
  redis.call('PUBLISH', meta, epoch .. '\31' .. offset .. '\31' .. payload)
  return offset
end
";

/// ARGV: room, kind (`F`, `V`, `J`, `L`), publication, member connection id, member value,
/// node, epoch candidate, stream length, ttl (s). Returns the offset.
const PUBLISH: &str = r"
local room, kind = ARGV[1], ARGV[2]
if kind == 'J' then
  redis.call('HSET', 'plexus:r:' .. room .. ':m', ARGV[4], ARGV[5])
  redis.call('SADD', 'plexus:n:' .. ARGV[6] .. ':rooms', room)
elseif kind == 'L' then
  redis.call('HDEL', 'plexus:r:' .. room .. ':m', ARGV[4])
  redis.call('HDEL', 'plexus:c:' .. ARGV[4], room)
end
local offset = publish(room, ARGV[3], ARGV[7], ARGV[8], ARGV[9])
if kind == 'J' then
  redis.call('HSET', 'plexus:c:' .. ARGV[4], room, offset)
end
return offset
";

/// Saves frames of sessions' streams to their journals, several per call (a frame saved
/// already, by a batch sent again, is left as it is). ARGV: journal length, then per frame five
/// fields: session id, seq, and `r`, the room and the offset of a room's frame, or `f`, the
/// frame and an empty field. A session without a record (it ended) gets nothing.
const JOURNAL: &str = r"
local maxlen = ARGV[1]
for i = 2, #ARGV, 5 do
  local key = 'plexus:s:' .. ARGV[i] .. ':j'
  local id = '0-' .. ARGV[i + 1]
  if redis.call('EXISTS', 'plexus:s:' .. ARGV[i]) == 0 then
    -- The session ended (its record went first in the same batch).
  elseif ARGV[i + 2] == 'r' then
    pcall(redis.call, 'XADD', key, 'MAXLEN', '~', maxlen, id, 'r', ARGV[i + 3], 'o', ARGV[i + 4])
  else
    pcall(redis.call, 'XADD', key, 'MAXLEN', '~', maxlen, id, 'f', ARGV[i + 3])
  end
end
return 1
";

/// A session moves to this node once the node that had it let it go or died: ARGV: session
/// id, the moving node, the lease's margin (ms). Returns `ok` and marks the session this
/// node's; `wait` while its node is alive and has not let it go; `gone` when no such session
/// is saved.
const CLAIM: &str = r"
local key = 'plexus:s:' .. ARGV[1]
local owner = redis.call('HGET', key, 'node')
if not owner then return 'gone' end
if owner ~= '' and owner ~= ARGV[2] then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local lease = redis.call('ZSCORE', 'plexus:nodes', owner)
  if lease and tonumber(lease) > now then return 'wait' end
  redis.call('SREM', 'plexus:n:' .. owner .. ':s', ARGV[1])
end
redis.call('HSET', key, 'node', ARGV[2])
redis.call('SADD', 'plexus:n:' .. ARGV[2] .. ':s', ARGV[1])
local cid = redis.call('HGET', key, 'cid')
redis.call('PERSIST', key)
redis.call('PERSIST', key .. ':j')
redis.call('PERSIST', 'plexus:c:' .. cid)
redis.call('HSET', 'plexus:moved', cid, ARGV[2])
return 'ok'
";

/// Sends a frame to a connection on the node its id names, or on the node its session moved
/// to. ARGV: connection id, its node, the direct frame.
const DIRECT: &str = r"
local node = redis.call('HGET', 'plexus:moved', ARGV[1]) or ARGV[2]
return redis.call('PUBLISH', 'plexus:n:' .. node, ARGV[3])
";

/// Counts an identity online (`+1`) or offline (`-1`) on a node in a room: the room's presence
/// hash counts the nodes it is online on, the node's presence set lists (room, identity) so that
/// a dead node's can be counted off. ARGV: room, identity, node, delta. Returns 1 when the
/// identity came online or went offline in the whole cluster by it.
const PRESENCE: &str = r"
local room, identity, node = ARGV[1], ARGV[2], ARGV[3]
local counts = 'plexus:r:' .. room .. ':p'
local mine = 'plexus:n:' .. node .. ':p'
local entry = room .. '\31' .. identity
if ARGV[4] == '1' then
  if redis.call('SADD', mine, entry) == 0 then return 0 end
  if redis.call('HINCRBY', counts, identity, 1) == 1 then return 1 end
  return 0
end
if redis.call('SREM', mine, entry) == 0 then return 0 end
if redis.call('HINCRBY', counts, identity, -1) <= 0 then
  redis.call('HDEL', counts, identity)
  return 1
end
return 0
";

/// ARGV: room. Returns the identities online in the room (identity, count, ...) and, in the same
/// order, their statuses (`plexus:status`, empty: none).
const ONLINE: &str = r"
local counts = redis.call('HGETALL', 'plexus:r:' .. ARGV[1] .. ':p')
local statuses = {}
for i = 1, #counts, 2 do
  statuses[#statuses + 1] = redis.call('HGET', 'plexus:status', counts[i]) or ''
end
return {counts, statuses}
";

/// ARGV: room. Returns the room's epoch (empty: no stream yet), its offset and its members
/// (connection id, value, ...), read together.
const SNAPSHOT: &str = r"
local meta = 'plexus:r:' .. ARGV[1]
local epoch = redis.call('HGET', meta, 'epoch') or ''
local offset = redis.call('HGET', meta, 'offset') or '0'
return {epoch, offset, redis.call('HGETALL', meta .. ':m')}
";

/// Renews a node's lease and ends the dead nodes': each dead node's members leave their rooms
/// (one `L` publication each, on the dead node's behalf, number 0). ARGV: node, lease (ms),
/// epoch candidate, stream length, ttl (s), `stay` (`1`; `0`: the node is leaving and ends its
/// own lease now). Returns whether the node's lease was new (it had been ended or never begun),
/// then the nodes ended, then every live node's plugin versions (node, JSON, ...), after storing
/// this node's (ARGV[7], a JSON object plugin → version), then the members ended (room,
/// connection id, identity, ...). ARGV[8]: how long a dead node's sessions wait for a resume (ms).
const BEAT: &str = r"
local node, lease, stay = ARGV[1], tonumber(ARGV[2]), ARGV[6]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local added = 0
if stay == '1' then
  added = redis.call('ZADD', 'plexus:nodes', now + lease, node)
  redis.call('HSET', 'plexus:versions', node, ARGV[7])
else
  redis.call('ZADD', 'plexus:nodes', 0, node)
end
local ended = {}
local left = {}
for _, dead in ipairs(redis.call('ZRANGEBYSCORE', 'plexus:nodes', '-inf', now)) do
  redis.call('ZREM', 'plexus:nodes', dead)
  local prefix = dead .. '\31'
  local rooms_key = 'plexus:n:' .. dead .. ':rooms'
  for _, room in ipairs(redis.call('SMEMBERS', rooms_key)) do
    local members = 'plexus:r:' .. room .. ':m'
    local fields = redis.call('HGETALL', members)
    for i = 1, #fields, 2 do
      if string.sub(fields[i + 1], 1, #prefix) == prefix then
        redis.call('HDEL', members, fields[i])
        table.insert(left, room)
        table.insert(left, fields[i])
        table.insert(left, string.sub(fields[i + 1], #prefix + 1))
        publish(room, 'L\31' .. dead .. '\31' .. '0\31' .. fields[i] .. '\31', ARGV[3], ARGV[4], ARGV[5])
      end
    end
  end
  redis.call('DEL', rooms_key)
  local presence_key = 'plexus:n:' .. dead .. ':p'
  for _, entry in ipairs(redis.call('SMEMBERS', presence_key)) do
    local cut = string.find(entry, '\31', 1, true)
    local room, identity = string.sub(entry, 1, cut - 1), string.sub(entry, cut + 1)
    local counts = 'plexus:r:' .. room .. ':p'
    if redis.call('HINCRBY', counts, identity, -1) <= 0 then
      redis.call('HDEL', counts, identity)
      publish(room, 'O\31' .. dead .. '\31' .. '0\31' .. identity .. '\31', ARGV[3], ARGV[4], ARGV[5])
    end
  end
  redis.call('DEL', presence_key)
  -- Its sessions wait for a resume on another node for the resume time, then go.
  local sessions_key = 'plexus:n:' .. dead .. ':s'
  for _, sid in ipairs(redis.call('SMEMBERS', sessions_key)) do
    local key = 'plexus:s:' .. sid
    if redis.call('HGET', key, 'node') == dead then
      local cid = redis.call('HGET', key, 'cid') or ''
      redis.call('PEXPIRE', key, ARGV[8])
      redis.call('PEXPIRE', key .. ':j', ARGV[8])
      redis.call('PEXPIRE', 'plexus:c:' .. cid, ARGV[8])
      redis.call('HDEL', 'plexus:moved', cid)
    end
  end
  redis.call('DEL', sessions_key)
  redis.call('HDEL', 'plexus:versions', dead)
  table.insert(ended, dead)
end
return {added, ended, redis.call('HGETALL', 'plexus:versions'), left}
";

/// The scripts, compiled once per process (their SHA-1 names them in `EVALSHA`).
pub struct Scripts {
    pub publish: Script,
    pub snapshot: Script,
    pub beat: Script,
    pub presence: Script,
    pub online: Script,
    pub journal: Script,
    pub claim: Script,
    pub direct: Script,
}

impl Default for Scripts {
    fn default() -> Scripts {
        Scripts {
            publish: Script::new(&format!("{PUBLISH_FN}{PUBLISH}")),
            snapshot: Script::new(SNAPSHOT),
            beat: Script::new(&format!("{PUBLISH_FN}{BEAT}")),
            presence: Script::new(PRESENCE),
            online: Script::new(ONLINE),
            journal: Script::new(JOURNAL),
            claim: Script::new(CLAIM),
            direct: Script::new(DIRECT),
        }
    }
}

impl Scripts {
    /// Every script's source, to load after connecting (a restarted Redis has none).
    pub fn all(&self) -> [&Script; 8] {
        [
            &self.publish,
            &self.snapshot,
            &self.beat,
            &self.presence,
            &self.online,
            &self.journal,
            &self.claim,
            &self.direct,
        ]
    }
}

impl std::fmt::Debug for Scripts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scripts").finish_non_exhaustive()
    }
}
