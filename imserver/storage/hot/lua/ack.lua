-- ARGV[2]: msgpack {{uid, {{msg_id, sender}, ...}}, ...}: no longer pending.
-- ARGV[3]: how long tombstones are kept (ms).
local gone_ms = tonumber(ARGV[3])
local now = now_ms()
for _, entry in ipairs(cmsgpack.unpack(ARGV[2])) do
  local uid = entry[1]
  local by_sender = {}
  for _, p in ipairs(entry[2]) do
    local ids = by_sender[p[2]]
    if not ids then
      ids = {}
      by_sender[p[2]] = ids
    end
    ids[#ids + 1] = p[1]
  end
  for sender, ids in pairs(by_sender) do
    remove_pending(uid, sender, ids, gone_ms, now)
  end
end
return 1
