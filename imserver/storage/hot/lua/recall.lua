-- ARGV[2]: msgpack {msg_id, session_id, sender, recipient, row or nil}
-- ARGV[3]: how long tombstones are kept (ms).
local r = cmsgpack.unpack(ARGV[2])
local id, sid, sender, recipient = r[1], r[2], r[3], r[4]
redis.call('ZREM', key('session_list', sid), id)
redis.call('DEL', key('msg', id))
remove_pending(recipient, sender, {id}, tonumber(ARGV[3]), now_ms())
if r[5] then
  apply_row(r[5], false)
end
return 1
