-- ARGV[2]: uid, ARGV[3]: device, ARGV[4]: reason, ARGV[5]: this node,
-- ARGV[6]: a nonce. Forgets the device's connection and, if another node
-- holds it, tells that node to kick it ({'k', uid, {conn, device, reason,
-- nonce, this node}}: it confirms to the nonce). Returns the connection
-- (false if the device is not online).
local uid, device, me = ARGV[2], ARGV[3], ARGV[5]
local devices = live_devices(uid, now_ms())
local d = devices[device]
if not d then
  return false
end
redis.call('HDEL', key('devices', uid), device)
local node = node_of(d[1])
if node ~= me then
  redis.call('PUBLISH', key('node', node), cmsgpack.pack({{'k', uid, {d[1], device, ARGV[4], ARGV[6], me}}}))
end
return d[1]
