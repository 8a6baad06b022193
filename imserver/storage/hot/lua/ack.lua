-- ARGV[2]: msgpack {{uid, {{msg_id, sender}, ...}}, ...}: no longer pending.
for _, entry in ipairs(cmsgpack.unpack(ARGV[2])) do
  local uid = entry[1]
  spoil_load(uid)
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
    remove_pending(uid, sender, ids)
  end
end
return 1
