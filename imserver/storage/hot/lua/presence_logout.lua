-- ARGV[2]: uid, ARGV[3]: value. Forget the presence only if it is still ours.
local k = key('presence', ARGV[2])
if redis.call('GET', k) == ARGV[3] then
  redis.call('DEL', k)
  return 1
end
return 0
