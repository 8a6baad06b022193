-- Fan-out of committed messages, in commit order.
-- ARGV[2]: msgpack {sent_at_ms, body_ttl, window_size, live_ms, gone_ms, messages, rows}
--   messages: {msg_id, session_id, sender, recipient, age_ms, record}
--     age_ms: time from the start of the commit transaction to sending this
--     record: the cached message (msgpack, opaque here)
--   rows: conversation rows, see apply_row
local data = cmsgpack.unpack(ARGV[2])
local now = now_ms()
local late = now - tonumber(data[1])
if late < 0 then late = 0 end
local ttl, window_size, live_ms, gone_ms = data[2], data[3], data[4], data[5]

for _, m in ipairs(data[6]) do
  local id, sid, sender, recipient = m[1], m[2], m[3], m[4]
  local age = tonumber(m[5]) + late
  local window = key('session_list', sid)
  if age <= live_ms then
    -- Not a message edited (invalidated) since its commit: the record is older.
    if redis.call('EXISTS', key('stale', id)) == 0 then
      redis.call('SET', key('msg', id), m[6], 'EX', ttl)
    end
    -- The window holds every normal message from its lowest id up: add
    -- only above that (or to start it), never leave a hole.
    local low = redis.call('ZRANGE', window, 0, 0)
    if low[1] == nil or tonumber(id) > tonumber(low[1]) then
      redis.call('ZADD', window, id, id)
      redis.call('ZREMRANGEBYRANK', window, 0, -(window_size + 1))
    end
  else
    -- Too late to know what the window saw meanwhile: drop it.
    redis.call('DEL', window)
  end
  local state = marker(recipient)
  if state then
    local kind = string.sub(state, 1, 1)
    if kind == 'D' then
      -- nothing: the copy is not used until reloaded
    elseif age >= gone_ms then
      -- Too old to tell from the tombstones whether it was acked: reload.
      redis.call('SET', key('hot', recipient), 'D')
    elseif not redis.call('ZSCORE', key('gone', recipient), id) then
      -- Ready, or loading (the snapshot may miss it): add. Adding what a
      -- load already brought changes nothing; acked or recalled ids are
      -- tombstoned and stay out.
      redis.call('ZADD', key('offline_msg', recipient, sender), id, id)
      redis.call('SADD', key('offline_senders', recipient), sender)
    end
  end
end
for _, r in ipairs(data[7]) do
  apply_row(r, false)
end
return 1
