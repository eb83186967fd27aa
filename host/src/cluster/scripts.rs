//! The Lua scripts the cluster runs in Redis. Each is atomic: a room's offset, its stream, its
//! member hash and the relay to the subscribed nodes change together, so that the stream holds
//! exactly what was relayed, in the order of its offsets.
//!
//! Keys, for a room `R`: `plexus:r:R` (hash: `epoch`, `offset`), `plexus:r:R:s` (the stream of
//! the room's last publications, entry ids `0-<offset>`), `plexus:r:R:m` (hash: connection id →
//! node and identity), `plexus:r:R:p` (hash: identity → how many nodes it is online on); the
//! channel `plexus:r:R`. For a node `N`: `plexus:n:N:rooms` (the rooms it had members in),
//! `plexus:n:N:p` (the room and identity of everyone online on it), the channel `plexus:n:N`
//! (direct frames). `plexus:status`: each identity's presence status. `plexus:nodes`: every live
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
end
return publish(room, ARGV[3], ARGV[7], ARGV[8], ARGV[9])
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
/// this node's (ARGV[7], a JSON object plugin → version).
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
  redis.call('HDEL', 'plexus:versions', dead)
  table.insert(ended, dead)
end
return {added, ended, redis.call('HGETALL', 'plexus:versions')}
";

/// The scripts, compiled once per process (their SHA-1 names them in `EVALSHA`).
pub struct Scripts {
    pub publish: Script,
    pub snapshot: Script,
    pub beat: Script,
    pub presence: Script,
    pub online: Script,
}

impl Default for Scripts {
    fn default() -> Scripts {
        Scripts {
            publish: Script::new(&format!("{PUBLISH_FN}{PUBLISH}")),
            snapshot: Script::new(SNAPSHOT),
            beat: Script::new(&format!("{PUBLISH_FN}{BEAT}")),
            presence: Script::new(PRESENCE),
            online: Script::new(ONLINE),
        }
    }
}

impl Scripts {
    /// Every script's source, to load after connecting (a restarted Redis has none).
    pub fn all(&self) -> [&Script; 5] {
        [
            &self.publish,
            &self.snapshot,
            &self.beat,
            &self.presence,
            &self.online,
        ]
    }
}

impl std::fmt::Debug for Scripts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scripts").finish_non_exhaustive()
    }
}
