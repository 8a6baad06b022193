-- ARGV[2]: ttl ms, ARGV[3]: max online devices per user, ARGV[4]: this node,
-- ARGV[5]: a nonce for this call's kicks, ARGV[6]: msgpack {{uid, device,
-- conn, since_ms, idle_ms}, ...}: connections that just logged in here.
-- Each becomes its device's connection. An older connection of the same
-- device is kicked (replaced), and beyond max the least recently active
-- other device (too_many_devices). A kick on another node is published to
-- it ({'k', uid, {conn, device, reason, nonce, this node}}: it confirms to
-- the nonce); the other nodes still holding the user hear that this node
-- joined ({'j', uid, {node, nonce}}: they confirm too, so that the login
-- completes only once every node that pushes to the user routes to this
-- one) unless it held the user already. Returns {msgpack of {for each
-- entry: {{device, conn, reason, nonce ('' if on this node)}, ...}, {other
-- nodes holding the user, ...}, {join nonces, ...}}, ...}, the generation
-- (false if missing)} (packed: Redis replies lose nested empty lists).
-- ARGV[7] '1': a replay of logins checked on this node only (Redis was
-- down): an entry whose device is held by a connection newer than it (a
-- later since_ms) takes nothing, and its answer kicks the entry itself
-- ({{device, conn, 'replaced', ''}}, the other nodes, {}).
local ttl, max, me, nonce = tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], ARGV[5]
local replay = ARGV[7] == '1'
local now = now_ms()
local by_node = {}
local answers = {}
local n_kicks = 0
for _, entry in ipairs(cmsgpack.unpack(ARGV[6])) do
  local uid, device, conn = entry[1], entry[2], entry[3]
  local k = key('devices', uid)
  local devices, count = live_devices(uid, now)
  local had = holds(devices, me)
  local kicks = {}
  local function kick(name, d, reason)
    local node = node_of(d[1])
    local tag = ''
    if node ~= me then
      n_kicks = n_kicks + 1
      tag = nonce .. ':' .. n_kicks
      add_for_node(by_node, node, {'k', uid, {d[1], name, reason, tag, me}})
    end
    kicks[#kicks + 1] = {name, d[1], reason, tag}
  end
  local old = devices[device]
  if replay and old and old[1] ~= conn and tonumber(old[2]) > tonumber(entry[4]) then
    answers[#answers + 1] = {{{device, conn, 'replaced', ''}}, other_nodes(devices, me), {}}
  else
    if old then
      count = count - 1
      if old[1] ~= conn then
        kick(device, old, 'replaced')
      end
    end
    local active = now - tonumber(entry[5])
    devices[device] = {conn, entry[4], active, now + ttl}
    count = count + 1
    redis.call('HSET', k, device, device_value(conn, entry[4], active, now + ttl))
    while count > max do
      local victim, least = nil, nil
      for name, d in pairs(devices) do
        if name ~= device and (not least or d[3] < least) then
          victim, least = name, d[3]
        end
      end
      if not victim then
        break
      end
      kick(victim, devices[victim], 'too_many_devices')
      devices[victim] = nil
      redis.call('HDEL', k, victim)
      count = count - 1
    end
    redis.call('PEXPIRE', k, ttl)
    local others = other_nodes(devices, me)
    local joins = {}
    if not had then
      for _, node in ipairs(others) do
        n_kicks = n_kicks + 1
        local tag = nonce .. ':' .. n_kicks
        add_for_node(by_node, node, {'j', uid, {me, tag}})
        joins[#joins + 1] = tag
      end
    end
    answers[#answers + 1] = {kicks, others, joins}
  end
end
publish_by_node(by_node)
-- Redis's clock (ms) second: transitions are stamped with it, one clock for every node.
return {cmsgpack.pack(answers), now, redis.call('GET', key('generation'))}
