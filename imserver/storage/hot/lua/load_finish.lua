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
local senders = key('offline_senders', uid)
for sender, ids in pairs(by_sender(snapshot[1], gone)) do
  local list = key('offline_msg', uid, sender)
  local args = {}
  for _, id in ipairs(ids) do
    args[#args + 1] = id
    args[#args + 1] = id
  end
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
