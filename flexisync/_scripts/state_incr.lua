-- state_incr: add to an integer StateStore value, giving it a TTL if it has none.
-- KEYS[1]  the value's key
-- ARGV[1]  the integer amount (the caller checked it fits in 64 bits)
-- ARGV[2]  TTL in ms to set when the key has no expiry (new key), or "" for none
-- Returns {"ok", new value}, or, with nothing written, {"wrongtype", type name} when
-- another program put a non-string there, {"overflow", ""} when the sum leaves the
-- 64-bit range, {"notinteger", ""} when the stored value is not a decimal integer.
-- The value is never parsed as JSON here: foreign data cannot make it fail.
local value = redis.pcall('INCRBY', KEYS[1], ARGV[1])
if type(value) == 'table' and value.err then
  local err = tostring(value.err)
  if string.sub(err, 1, 9) == 'WRONGTYPE' then
    return {'wrongtype', tostring(redis.call('TYPE', KEYS[1]).ok)}
  elseif string.find(err, 'overflow', 1, true) then
    return {'overflow', ''}
  end
  return {'notinteger', ''}
end
if ARGV[2] ~= '' and redis.call('PTTL', KEYS[1]) == -1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return {'ok', value}
