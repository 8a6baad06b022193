-- ARGV[2]: uid, ARGV[3]: after (exclusive), ARGV[4]: limit, ARGV[5]: sender or ''
-- Returns false if the user has no hot copy, else {msg_id, sender, ...}
-- oldest first.
local uid, after, limit, only = ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
if not ready(uid) then
  return false
end
local senders = only ~= '' and {only} or redis.call('SMEMBERS', key('offline_senders', uid))
local found = {}
for _, sender in ipairs(senders) do
  local ids = redis.call('ZRANGEBYSCORE', key('offline_msg', uid, sender), '(' .. after, '+inf',
    'LIMIT', 0, limit)
  for _, id in ipairs(ids) do
    found[#found + 1] = {tonumber(id), id, sender}
  end
end
table.sort(found, function(a, b) return a[1] < b[1] end)
local out = {}
for i = 1, math.min(limit, #found) do
  out[#out + 1] = found[i][2]
  out[#out + 1] = found[i][3]
end
return out
