-- ARGV[2]: uid, ARGV[3]: before (exclusive) or '', ARGV[4]: limit (0: all)
-- false, or {session_id, last_msg_id, total, read, ...} newest first. Also
-- false if a counter is missing (the copy is broken: reload).
local uid, before, limit = ARGV[2], ARGV[3], tonumber(ARGV[4])
if not ready(uid) then
  return false
end
local top = before == '' and '+inf' or '(' .. before
local args = {key('conv', uid), top, '-inf', 'WITHSCORES'}
if limit > 0 then
  args[#args + 1] = 'LIMIT'
  args[#args + 1] = 0
  args[#args + 1] = limit
end
local entries = redis.call('ZREVRANGEBYSCORE', unpack(args))
local out = {}
for i = 1, #entries, 2 do
  local sid = entries[i]
  local total = redis.call('GET', key('session_count', sid, uid))
  local read = redis.call('GET', key('session_read_count', sid, uid))
  if not total or not read then
    redis.call('DEL', key('hot', uid))
    return false
  end
  out[#out + 1] = sid
  out[#out + 1] = entries[i + 1]
  out[#out + 1] = total
  out[#out + 1] = read
end
return out
