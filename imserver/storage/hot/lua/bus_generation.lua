-- ARGV[2]: a fresh generation. {p}:generation is written once by the first
-- node to find it missing (at start, or after Redis lost its data) and never
-- expires: a node that sees a value other than the last one it saw knows that
-- everything written before (presences above all) is gone. Returns the value.
local k = key('generation')
local g = redis.call('GET', k)
if not g then
  redis.call('SET', k, ARGV[2])
  g = ARGV[2]
end
return g
