-- The node's check every second. ARGV[2]: a fresh generation (as in
-- bus_generation: written if the bus has none), ARGV[3]: this node, ARGV[4]:
-- a probe for this node's own channel. PUBLISH answers how many subscribers
-- got it: 0 means this node's subscription is not on this server (killed
-- without the node noticing, or made to another server), whatever the node
-- believes. Returns {the generation, receivers}.
return {generation(ARGV[2]), redis.call('PUBLISH', key('node', ARGV[3]), ARGV[4])}
