-- ARGV[2]: uid. Returns msgpack of {{device, conn, since_ms}, ...}: its live devices.
local out = {}
for name, d in pairs(live_devices(ARGV[2], now_ms())) do
  out[#out + 1] = {name, d[1], d[2]}
end
return cmsgpack.pack(out)
