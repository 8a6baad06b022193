-- ARGV[2]: msgpack {uid, ...}. {uid, nickname, avatar, version, ...} for the cached ones.
local out = {}
for _, uid in ipairs(cmsgpack.unpack(ARGV[2])) do
  local p = redis.call('HMGET', key('user', uid), 'n', 'a', 'v')
  if p[3] then
    out[#out + 1] = uid
    out[#out + 1] = p[1]
    out[#out + 1] = p[2]
    out[#out + 1] = p[3]
  end
end
return out
