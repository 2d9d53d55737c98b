-- state_incr: add to an integer StateStore value, giving it a TTL if it has none.
-- KEYS[1]  the value's key
-- ARGV[1]  the integer amount
-- ARGV[2]  TTL in ms to set when the key has no expiry (new key), or "" for none
-- Returns the new value. Errors (from INCRBY) when the value is not an integer.
local value = redis.call('INCRBY', KEYS[1], ARGV[1])
if ARGV[2] ~= '' and redis.call('PTTL', KEYS[1]) == -1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return value
