-- ARGV[2]: this node, ARGV[3]: msgpack {{uid, device, conn}, ...}:
-- connections gone from this node. Each device is forgotten only if it is
-- still that connection's. A user this node no longer holds is announced to
-- the nodes still holding it ({'l', uid, node}: they stop routing to us).
-- Returns {now_ms, the uids left without a device on any node (their last one
-- went)}: Redis's clock stamps transitions, one clock for every node.
local me = ARGV[2]
local now = now_ms()
local by_node = {}
local done = {}
for _, entry in ipairs(cmsgpack.unpack(ARGV[3])) do
  local uid = entry[1]
  local devices = live_devices(uid, now)
  local d = devices[entry[2]]
  if d and d[1] == entry[3] then
    redis.call('HDEL', key('devices', uid), entry[2])
    devices[entry[2]] = nil
  end
  done[uid] = devices
end
local nobody = {}
for uid, devices in pairs(done) do
  if next(devices) == nil then
    nobody[#nobody + 1] = uid
  end
  if not holds(devices, me) then
    for _, node in ipairs(other_nodes(devices, me)) do
      add_for_node(by_node, node, {'l', uid, me})
    end
  end
end
publish_by_node(by_node)
return {now, nobody}
