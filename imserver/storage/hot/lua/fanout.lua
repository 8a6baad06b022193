-- Fan-out of committed messages, in commit order.
-- ARGV[2]: msgpack {sent_at_ms, body_ttl, window_size, live_ms, gone_ms, messages, rows}
--   messages: {msg_id, session_id, sender, recipient, age_ms, record}
--     age_ms: time from the start of the commit transaction to sending this
--     record: the cached message (msgpack, opaque here)
--   rows: conversation rows, see apply_row
--
-- The result is what the messages' one-by-one effects would give, but the
-- commands are grouped: a session's window is read once and written once
-- with all its ids, a recipient's marker read once, a pending list written
-- once per (recipient, sender). A batch of the pairs benchmark holds ~5
-- messages per session: six commands per message became about two (issue 13).
local data = cmsgpack.unpack(ARGV[2])
local now = now_ms()
local late = now - tonumber(data[1])
if late < 0 then late = 0 end
local ttl, window_size, live_ms, gone_ms = data[2], data[3], data[4], data[5]
local messages = data[6]

-- Edited (invalidated) messages are rare: one EXISTS for the batch, and a
-- check per message only when one of them is stale.
local stale_keys = {}
for i, m in ipairs(messages) do
  stale_keys[i] = key('stale', m[1])
end
local any_stale = false
for i = 1, #stale_keys, 1000 do
  if redis.call('EXISTS', unpack(stale_keys, i, math.min(i + 999, #stale_keys))) > 0 then
    any_stale = true
    break
  end
end

-- Per session, in first-seen order: {low, read, drop, adds}. The window
-- holds every normal message from its lowest id up: an id is added only
-- above the lowest (or to start it), never leaving a hole. `low` follows
-- the window as the one-by-one adds would leave it; the trim they would do
-- between adds can only raise it past ids that the final trim removes too.
local windows, order = {}, {}
-- Per recipient: its marker (false: none). Pending ids per recipient, sender.
local states, offline = {}, {}

for _, m in ipairs(messages) do
  local id, sid, sender, recipient = m[1], m[2], m[3], m[4]
  local age = tonumber(m[5]) + late
  local w = windows[sid]
  if not w then
    w = {low = nil, read = false, drop = false, adds = {}}
    windows[sid] = w
    order[#order + 1] = sid
  end
  if age <= live_ms then
    -- Not a message edited (invalidated) since its commit: the record is older.
    if not any_stale or redis.call('EXISTS', key('stale', id)) == 0 then
      redis.call('SET', key('msg', id), m[6], 'EX', ttl)
    end
    if not w.read then
      w.low = redis.call('ZRANGE', key('session_list', sid), 0, 0)[1]
      w.read = true
    end
    if w.low == nil or tonumber(id) > tonumber(w.low) then
      w.adds[#w.adds + 1] = id
      if w.low == nil then w.low = id end
    end
  else
    -- Too late to know what the window saw meanwhile: drop it (and what
    -- this batch added to it before).
    w.drop, w.read, w.low, w.adds = true, true, nil, {}
  end
  local state = states[recipient]
  if state == nil then
    state = marker(recipient) or false
    states[recipient] = state
  end
  if state and string.sub(state, 1, 1) ~= 'D' then
    -- (D: nothing, the copy is not used until reloaded)
    if age >= gone_ms then
      -- Too old to tell from the tombstones whether it was acked: reload.
      redis.call('SET', key('hot', recipient), 'D')
      states[recipient] = 'D'
    elseif not redis.call('ZSCORE', key('gone', recipient), id) then
      -- Ready, or loading (the snapshot may miss it): add. Adding what a
      -- load already brought changes nothing; acked or recalled ids are
      -- tombstoned and stay out.
      local ids = table_at(table_at(offline, recipient), sender)
      ids[#ids + 1] = id
    end
  end
end

for _, sid in ipairs(order) do
  local w = windows[sid]
  local window = key('session_list', sid)
  if w.drop then
    redis.call('DEL', window)
  end
  if #w.adds > 0 then
    zadd_ids(window, w.adds)
    redis.call('ZREMRANGEBYRANK', window, 0, -(window_size + 1))
  end
end
for recipient, by_sender in pairs(offline) do
  for sender, ids in pairs(by_sender) do
    zadd_ids(key('offline_msg', recipient, sender), ids)
    redis.call('SADD', key('offline_senders', recipient), sender)
  end
end
for _, r in ipairs(data[7]) do
  apply_row(r, false)
end
return 1
