-- ARGV[2]: uid, ARGV[3]: value (node:incarnation:epoch), ARGV[4]: ttl ms
-- Makes this connection the user's presence. If another node held it, that
-- node is told to kick its connection ({kind, uid, old value} on its channel).
-- Returns the previous value, or false.
local k = key('presence', ARGV[2])
local old = redis.call('SET', k, ARGV[3], 'PX', ARGV[4], 'GET')
if old and old ~= ARGV[3] then
  local node = string.match(old, '^([^:]+):')
  local mine = string.match(ARGV[3], '^([^:]+):')
  if node and node ~= mine then
    redis.call('PUBLISH', key('node', node), cmsgpack.pack({{'k', ARGV[2], old}}))
  end
end
return old
