-- ARGV[2]: msgpack {{uid, ...}, {session_id, ...}, {msg_id, ...}, stale_ms}:
-- forget what may be stale (the users' copies, the sessions' windows, the
-- cached messages). A forgotten message is marked stale for stale_ms (the
-- fan-out's live_ms and a margin): a send's fan-out still running on another
-- node does not cache its record (the body from before an edit) again.
local what = cmsgpack.unpack(ARGV[2])
for _, uid in ipairs(what[1]) do
  redis.call('DEL', key('hot', uid))
end
for _, sid in ipairs(what[2]) do
  redis.call('DEL', key('session_list', sid))
end
local stale_ms = tonumber(what[4] or 0)
for _, id in ipairs(what[3] or {}) do
  redis.call('DEL', key('msg', id))
  if stale_ms > 0 then
    redis.call('SET', key('stale', id), '1', 'PX', stale_ms)
  end
end
return 1
