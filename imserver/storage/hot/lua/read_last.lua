-- ARGV[2]: msgpack {session_id, ...}. {session_id, newest msg_id in the window or '', ...}
local out = {}
for _, sid in ipairs(cmsgpack.unpack(ARGV[2])) do
  out[#out + 1] = sid
  out[#out + 1] = redis.call('ZREVRANGE', key('session_list', sid), 0, 0)[1] or ''
end
return out
