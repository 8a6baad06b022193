-- ARGV[2]: msgpack {{uid, device, conn, idle_ms}, ...}: this node's devices
-- that were active since they were last written. Each device field that still
-- holds that connection gets its last activity (now - idle_ms), so a login on
-- any node picks the really least recently active device as too_many's victim;
-- others are left alone (the refresh sorts them out). Returns how many were
-- written.
local now = now_ms()
local written = 0
for _, entry in ipairs(cmsgpack.unpack(ARGV[2])) do
  local uid, device, conn = entry[1], entry[2], entry[3]
  local k = key('devices', uid)
  local value = redis.call('HGET', k, device)
  if value then
    local held, since, _, expires = string.match(value, '^(.*)|(%d+)|(%d+)|(%d+)$')
    if held == conn and tonumber(expires) > now then
      redis.call('HSET', k, device, device_value(conn, since, now - tonumber(entry[4]), expires))
      written = written + 1
    end
  end
end
return written
