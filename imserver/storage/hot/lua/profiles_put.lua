-- ARGV[2]: msgpack {{uid, nickname, avatar, version}, ...}; ARGV[3]: ttl seconds.
-- A cached profile is only replaced by a newer version.
local ttl = tonumber(ARGV[3])
for _, p in ipairs(cmsgpack.unpack(ARGV[2])) do
  local k = key('user', p[1])
  local current = redis.call('HGET', k, 'v')
  if not current or tonumber(current) < tonumber(p[4]) then
    redis.call('HSET', k, 'n', p[2], 'a', p[3], 'v', p[4])
  end
  redis.call('EXPIRE', k, ttl)
end
return 1
