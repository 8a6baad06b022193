-- ARGV[2]: uid, ARGV[3]: nonce. A new load supersedes any other.
redis.call('SET', key('hot', ARGV[2]), 'L' .. ARGV[3])
return 1
