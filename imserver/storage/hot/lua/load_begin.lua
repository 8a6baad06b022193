-- ARGV[2]: uid, ARGV[3]: nonce. Start (re)loading a user's copy: empty its
-- pending lists (the snapshot will refill them; fan-outs from now on add
-- to them as usual). A new load supersedes any other.
local uid = ARGV[2]
local senders = key('offline_senders', uid)
for _, sender in ipairs(redis.call('SMEMBERS', senders)) do
  redis.call('DEL', key('offline_msg', uid, sender))
end
redis.call('DEL', senders)
redis.call('SET', key('hot', uid), 'L' .. ARGV[3])
return 1
