-- ARGV[2]: msgpack {{uid, value}, ...}: connections gone from this node.
-- Each presence is forgotten only if it is still that connection's.
for _, entry in ipairs(cmsgpack.unpack(ARGV[2])) do
  local k = key('presence', entry[1])
  if redis.call('GET', k) == entry[2] then
    redis.call('DEL', k)
  end
end
return 0
