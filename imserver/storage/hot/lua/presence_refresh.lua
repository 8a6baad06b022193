-- ARGV[2]: ttl ms, ARGV[3]: msgpack {{uid, value}, ...}: this node's users.
-- Extends each presence that is still ours, restores the ones that vanished
-- (a Redis restart or FLUSHALL), and returns {the generation (false if
-- missing), the uids now held elsewhere (their local connection is stale)}.
local ttl = ARGV[2]
local lost = {}
for _, entry in ipairs(cmsgpack.unpack(ARGV[3])) do
  local k = key('presence', entry[1])
  local current = redis.call('GET', k)
  if current == entry[2] or not current then
    redis.call('SET', k, entry[2], 'PX', ttl)
  else
    lost[#lost + 1] = entry[1]
  end
end
return {redis.call('GET', key('generation')), lost}
