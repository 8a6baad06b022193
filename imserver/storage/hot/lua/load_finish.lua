-- ARGV[2]: uid, ARGV[3]: nonce, ARGV[4]: msgpack {pending, rows}
--   pending: {{msg_id, sender}, ...} as SQL had it after load_begin
-- Adds the snapshot to what fan-outs added since load_begin, except ids
-- acked or recalled meanwhile (tombstones), merges the rows and marks the
-- copy ready. Returns 0 if another load (or an invalidation) came since.
local uid = ARGV[2]
local hot = key('hot', uid)
if redis.call('GET', hot) ~= 'L' .. ARGV[3] then
  return 0
end
local snapshot = cmsgpack.unpack(ARGV[4])
local gone = {}
for _, id in ipairs(redis.call('ZRANGE', key('gone', uid), 0, -1)) do
  gone[id] = true
end
local by_sender = {}
for _, p in ipairs(snapshot[1]) do
  if not gone[p[1]] then
    local args = by_sender[p[2]]
    if not args then
      args = {}
      by_sender[p[2]] = args
    end
    args[#args + 1] = p[1]
    args[#args + 1] = p[1]
  end
end
local senders = key('offline_senders', uid)
for sender, args in pairs(by_sender) do
  local list = key('offline_msg', uid, sender)
  for i = 1, #args, 2000 do
    redis.call('ZADD', list, unpack(args, i, math.min(i + 1999, #args)))
  end
  redis.call('SADD', senders, sender)
end
for _, r in ipairs(snapshot[2]) do
  apply_row(r, true)
end
redis.call('SET', hot, 'R' .. now_ms())
return 1
