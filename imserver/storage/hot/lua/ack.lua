-- ARGV[2]: msgpack {{uid, {{msg_id, sender}, ...}}, ...}: no longer pending.
-- ARGV[3]: how long tombstones are kept (ms).
local gone_ms = tonumber(ARGV[3])
local now = now_ms()
for _, entry in ipairs(cmsgpack.unpack(ARGV[2])) do
  local uid = entry[1]
  for sender, ids in pairs(by_sender(entry[2])) do
    remove_pending(uid, sender, ids, gone_ms, now)
  end
end
return 1
