-- ARGV[2]: ttl ms, ARGV[3]: msgpack {{uid, value}, ...}: connections that just
-- logged in on this node (value: node:incarnation:epoch). Each becomes its
-- user's presence. A node that held the user before is told to kick that
-- connection ({'k', uid, old value} entries, one PUBLISH per node). Returns
-- {how many kicks went out, the generation (false if missing)}.
local ttl = ARGV[2]
local by_node = {}
local sent = 0
for _, entry in ipairs(cmsgpack.unpack(ARGV[3])) do
  local uid, value = entry[1], entry[2]
  local old = redis.call('SET', key('presence', uid), value, 'PX', ttl, 'GET')
  if old and old ~= value then
    local node = node_of(old)
    if node and node ~= node_of(value) then
      add_for_node(by_node, node, {'k', uid, old})
      sent = sent + 1
    end
  end
end
publish_by_node(by_node)
return {sent, redis.call('GET', key('generation'))}
