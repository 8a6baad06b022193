-- ARGV[2]: ttl ms, ARGV[3]: this node, ARGV[4]: msgpack {{uid, device,
-- conn, since_ms, idle_ms}, ...}: this node's connections. Extends each
-- device that is still ours (with its last activity), restores the ones that
-- vanished (a Redis restart or FLUSHALL), and returns {the generation (false
-- if missing), msgpack of {{{uid, device}, ...} now held by another
-- connection (stale here), {{uid, other node, ...}, ...} for the users other
-- nodes hold too}}.
local ttl, me = tonumber(ARGV[2]), ARGV[3]
local now = now_ms()
local lost = {}
local users = {}
local order = {}
for _, entry in ipairs(cmsgpack.unpack(ARGV[4])) do
  local uid, device, conn = entry[1], entry[2], entry[3]
  local devices = users[uid]
  if not devices then
    devices = live_devices(uid, now)
    users[uid] = devices
    order[#order + 1] = uid
  end
  local d = devices[device]
  if not d or d[1] == conn then
    local active = now - tonumber(entry[5])
    devices[device] = {conn, entry[4], active, now + ttl}
    redis.call('HSET', key('devices', uid), device, device_value(conn, entry[4], active, now + ttl))
    redis.call('PEXPIRE', key('devices', uid), ttl)
  else
    lost[#lost + 1] = {uid, device}
  end
end
local shared = {}
for _, uid in ipairs(order) do
  local others = other_nodes(users[uid], me)
  if #others > 0 then
    table.insert(others, 1, uid)
    shared[#shared + 1] = others
  end
end
return {redis.call('GET', key('generation')), cmsgpack.pack({lost, shared})}
