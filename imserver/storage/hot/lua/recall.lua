-- ARGV[2]: msgpack {msg_id, session_id, sender, recipient, row or nil}
local r = cmsgpack.unpack(ARGV[2])
local id, sid, sender, recipient = r[1], r[2], r[3], r[4]
redis.call('ZREM', key('session_list', sid), id)
redis.call('DEL', key('msg', id))
spoil_load(recipient)
remove_pending(recipient, sender, {id})
if r[5] then
  apply_row(r[5], false)
end
return 1
