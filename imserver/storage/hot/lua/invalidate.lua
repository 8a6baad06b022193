-- ARGV[2]: msgpack {{uid, ...}, {session_id, ...}}: forget what may be stale.
local what = cmsgpack.unpack(ARGV[2])
for _, uid in ipairs(what[1]) do
  redis.call('DEL', key('hot', uid))
end
for _, sid in ipairs(what[2]) do
  redis.call('DEL', key('session_list', sid))
end
return 1
