-- ARGV[2]: msgpack {{uid, ...}, {session_id, ...}, {msg_id, ...}}:
-- forget what may be stale (the users' copies, the sessions' windows, the
-- cached messages).
local what = cmsgpack.unpack(ARGV[2])
for _, uid in ipairs(what[1]) do
  redis.call('DEL', key('hot', uid))
end
for _, sid in ipairs(what[2]) do
  redis.call('DEL', key('session_list', sid))
end
for _, id in ipairs(what[3] or {}) do
  redis.call('DEL', key('msg', id))
end
return 1
