-- ARGV[2]: this node, ARGV[3]: msgpack {{uid, frame, exclude conn or ''},
-- ...}: pushes for the user's connections on other nodes. Each goes to every
-- other node holding one of the user's devices, one PUBLISH per node ({'p',
-- uid, frame, exclude} entries). Users online nowhere else are skipped:
-- their messages stay pending. Returns {how many went out, the generation
-- (false if Redis lost it: presences may be missing too)}.
local me = ARGV[2]
local now = now_ms()
local by_node = {}
local nodes = {}
local sent = 0
for _, entry in ipairs(cmsgpack.unpack(ARGV[3])) do
  local uid = entry[1]
  local targets = nodes[uid]
  if not targets then
    targets = other_nodes(live_devices(uid, now), me)
    nodes[uid] = targets
  end
  for _, node in ipairs(targets) do
    add_for_node(by_node, node, {'p', uid, entry[2], entry[3]})
    sent = sent + 1
  end
end
publish_by_node(by_node)
return {sent, redis.call('GET', key('generation'))}
