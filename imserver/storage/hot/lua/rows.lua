-- ARGV[2]: msgpack {row, ...}: conversation rows changed by a read.
for _, r in ipairs(cmsgpack.unpack(ARGV[2])) do
  apply_row(r, false)
end
return 1
