-- Shared by every imserver script. ARGV[1] is the key prefix.
--
-- Ids and uids travel as decimal strings: Lua numbers are doubles and
-- tostring() keeps only 14 digits, so a number must never become a key,
-- a member or a score. Message and session ids are below 2^53, so
-- tonumber() of them is exact and fine for comparisons.
--
-- The per-user marker {p}:hot:{uid} says whether the user's pending lists,
-- conversation list and counters here are a complete copy of SQL:
--   absent     nothing trustworthy here: readers go to SQL
--   L<nonce>   a load from SQL is in progress
--   D          a fan-out too old to judge came: reload
--   R<ms>      ready, loaded at this Redis time
--
-- {p}:gone:{uid} (zset msg_id -> time) remembers for GONE_MS which ids were
-- acked or recalled, so that a fan-out or a load snapshot arriving after
-- them cannot make them pending again.
local P = ARGV[1]

local function key(...)
  return P .. ':' .. table.concat({...}, ':')
end

-- {p}:generation is written once by the first node to find it missing (at
-- start, or after Redis lost its data) and never expires: a node that sees
-- a value other than the last one it saw knows that everything written
-- before (presences above all) is gone. Returns the value, `fresh` if the
-- bus had none.
local function generation(fresh)
  local k = key('generation')
  local g = redis.call('GET', k)
  if not g then
    redis.call('SET', k, fresh)
    g = fresh
  end
  return g
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function marker(uid)
  return redis.call('GET', key('hot', uid))
end

local function ready(uid)
  local m = marker(uid)
  return m and string.sub(m, 1, 1) == 'R'
end

-- Write a conversation row {uid, sid, last, total, read, version} unless a
-- newer version is already here; skipped for users without a hot copy.
local function apply_row(r, loading)
  local uid, sid = r[1], r[2]
  if not loading and not marker(uid) then
    return
  end
  local vkey = key('session_ver', sid, uid)
  local current = redis.call('GET', vkey)
  if current and tonumber(current) >= tonumber(r[6]) then
    return
  end
  redis.call('SET', vkey, r[6])
  redis.call('SET', key('session_count', sid, uid), r[4])
  redis.call('SET', key('session_read_count', sid, uid), r[5])
  redis.call('ZADD', key('conv', uid), 'GT', r[3], sid)
end

-- ZADD ids to a sorted set, each scored `score` (or its own value if nil),
-- in slices: unpack() of a long list would overflow Lua's stack.
local function zadd_ids(zset, ids, score)
  local args = {}
  for _, id in ipairs(ids) do
    args[#args + 1] = score or id
    args[#args + 1] = id
  end
  for i = 1, #args, 2000 do
    redis.call('ZADD', zset, unpack(args, i, math.min(i + 1999, #args)))
  end
end

-- The node of a presence value (node:incarnation:epoch).
local function node_of(value)
  return string.match(value, '^([^:]+):')
end

-- The table at t[k], made (empty) if there is none.
local function table_at(t, k)
  local found = t[k]
  if not found then
    found = {}
    t[k] = found
  end
  return found
end

-- Add an entry to its node's list in {node = {entry, ...}}.
local function add_for_node(by_node, node, entry)
  local list = table_at(by_node, node)
  list[#list + 1] = entry
end

-- One PUBLISH per node of {node = {entry, ...}}, on that node's channel.
local function publish_by_node(by_node)
  for node, list in pairs(by_node) do
    redis.call('PUBLISH', key('node', node), cmsgpack.pack(list))
  end
end

-- {{msg_id, sender}, ...} -> {sender = {msg_id, ...}}, skipping ids in `skip`.
local function by_sender(pairs, skip)
  local out = {}
  for _, p in ipairs(pairs) do
    if not (skip and skip[p[1]]) then
      local ids = table_at(out, p[2])
      ids[#ids + 1] = p[1]
    end
  end
  return out
end

-- Remove ids from a pending list, leaving a tombstone for each, so a late
-- fan-out cannot add it back (even onto a copy loaded after this).
local function remove_pending(uid, sender, ids, gone_ms, now)
  local list = key('offline_msg', uid, sender)
  for i = 1, #ids, 1000 do
    redis.call('ZREM', list, unpack(ids, i, math.min(i + 999, #ids)))
  end
  if redis.call('ZCARD', list) == 0 then
    redis.call('SREM', key('offline_senders', uid), sender)
  end
  local gone = key('gone', uid)
  zadd_ids(gone, ids, now)
  redis.call('ZREMRANGEBYSCORE', gone, '-inf', now - gone_ms)
  redis.call('PEXPIRE', gone, gone_ms + 1000)
end

-- {p}:devices:{uid} (hash) holds the user's connected devices: field = the
-- device name, value = conn|since_ms|active_ms|expires_ms, conn being the
-- connection (node:incarnation:epoch), since its connected_at, active the
-- Redis time of its last request, expires when it is gone unless its node
-- refreshes it. Expired fields count as absent and are removed here; the
-- key has a TTL too (the longest a field may live).

-- The live devices of a user: {device = {conn, since, active, expires}}
-- (expired fields removed), and how many.
local function live_devices(uid, now)
  local k = key('devices', uid)
  local flat = redis.call('HGETALL', k)
  local out, n = {}, 0
  for i = 1, #flat, 2 do
    local conn, since, active, expires = string.match(flat[i + 1], '^(.*)|(%d+)|(%d+)|(%d+)$')
    if conn and tonumber(expires) > now then
      out[flat[i]] = {conn, since, tonumber(active), tonumber(expires)}
      n = n + 1
    else
      redis.call('HDEL', k, flat[i])
    end
  end
  return out, n
end

local function device_value(conn, since, active, expires)
  return conn .. '|' .. since .. '|' .. active .. '|' .. expires
end

-- The nodes other than `me` holding one of `devices` (a list, each once).
local function other_nodes(devices, me)
  local seen, out = {}, {}
  for _, d in pairs(devices) do
    local node = node_of(d[1])
    if node and node ~= me and not seen[node] then
      seen[node] = true
      out[#out + 1] = node
    end
  end
  return out
end

-- Whether `me` holds one of `devices`.
local function holds(devices, me)
  for _, d in pairs(devices) do
    if node_of(d[1]) == me then
      return true
    end
  end
  return false
end
