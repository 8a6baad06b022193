-- ARGV[2]: uid. false, or {sender, count, last_msg_id, ...}
local uid = ARGV[2]
if not ready(uid) then
  return false
end
local out = {}
for _, sender in ipairs(redis.call('SMEMBERS', key('offline_senders', uid))) do
  local list = key('offline_msg', uid, sender)
  local count = redis.call('ZCARD', list)
  if count > 0 then
    out[#out + 1] = sender
    out[#out + 1] = count
    out[#out + 1] = redis.call('ZREVRANGE', list, 0, 0)[1]
  end
end
return out
