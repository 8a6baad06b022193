-- ARGV[2]: this node, ARGV[3]: msgpack {{uid, frame}, ...}: pushes for users
-- not connected here. Each goes to the node that holds the user, one PUBLISH
-- per node ({'p', uid, frame} entries). Users that are not online anywhere
-- are skipped: their messages stay pending. Returns {how many went out, the
-- generation (false if Redis lost it: presences may be missing too)}.
local me = ARGV[2]
local by_node = {}
local sent = 0
for _, entry in ipairs(cmsgpack.unpack(ARGV[3])) do
  local value = redis.call('GET', key('presence', entry[1]))
  if value then
    local node = node_of(value)
    if node and node ~= me then
      add_for_node(by_node, node, {'p', entry[1], entry[2]})
      sent = sent + 1
    end
  end
end
publish_by_node(by_node)
return {sent, redis.call('GET', key('generation'))}
