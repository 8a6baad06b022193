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
  zadd_ids(key('offline_msg', uid, sender), ids)
  redis.call('SADD', senders, sender)
end
for _, r in ipairs(snapshot[2]) do
  apply_row(r, true)
end
redis.call('SET', hot, 'R' .. now_ms())
return 1
