-- ARGV[2..]: uids. Returns msgpack of {{{device, conn, since_ms}, ...}, ...}:
-- each one's live devices, in the order asked (one call for many users).
local now = now_ms()
local out = {}
for i = 2, #ARGV do
  local devices = {}
  for name, d in pairs(live_devices(ARGV[i], now)) do
    devices[#devices + 1] = {name, d[1], d[2]}
  end
  out[#out + 1] = devices
end
return cmsgpack.pack(out)
