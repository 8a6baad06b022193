-- ARGV[2]: uid, ARGV[3]: nonce, ARGV[4]: msgpack {pending, rows}
--   pending: {{msg_id, sender}, ...} as SQL had it after load_begin
-- Replaces the user's pending lists and merges the rows, unless anything
-- changed the user meanwhile (then the marker is no longer ours): returns 0.
local uid = ARGV[2]
local hot = key('hot', uid)
if redis.call('GET', hot) ~= 'L' .. ARGV[3] then
  return 0
end
local snapshot = cmsgpack.unpack(ARGV[4])
local senders = key('offline_senders', uid)
for _, sender in ipairs(redis.call('SMEMBERS', senders)) do
  redis.call('DEL', key('offline_msg', uid, sender))
end
redis.call('DEL', senders)
local by_sender = {}
for _, p in ipairs(snapshot[1]) do
  local args = by_sender[p[2]]
  if not args then
    args = {}
    by_sender[p[2]] = args
  end
  args[#args + 1] = p[1]
  args[#args + 1] = p[1]
end
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
