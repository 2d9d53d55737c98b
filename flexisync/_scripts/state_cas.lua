-- state_cas: compare-and-set one StateStore value (the write half of update()).
-- KEYS[1]  the value's key
-- ARGV[1]  "1" when the caller read a value, "0" when it read nothing
-- ARGV[2]  the raw JSON the caller read (ignored when ARGV[1] == "0")
-- ARGV[3]  the new raw JSON
-- ARGV[4]  TTL mode: "px" (expire after ARGV[5] ms), "keep" (keep the current TTL)
-- ARGV[5]  milliseconds, for "px"
-- Returns 1 when written, 0 when the value changed since the caller read it, and the
-- string "wrongtype" (nothing written) when another program put a non-string there.
-- The values are compared as bytes, never parsed: foreign data cannot make it fail.
local current = redis.pcall('GET', KEYS[1])
if type(current) == 'table' and current.err then
  return 'wrongtype'
end
if ARGV[1] == '1' then
  if current ~= ARGV[2] then return 0 end
elseif current then
  return 0
end
if ARGV[4] == 'px' then
  redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[5])
else
  redis.call('SET', KEYS[1], ARGV[3], 'KEEPTTL')
end
return 1
