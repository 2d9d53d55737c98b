-- lock_extend: reset a lease's TTL if (and only if) this owner still holds it.
-- KEYS[1]  the lease
-- ARGV[1]  the owner token
-- ARGV[2]  the new TTL in milliseconds
-- Returns "extended", "expired" (no lease: it lapsed or was deleted) or "taken".
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 'extended'
end
if current then return 'taken' end
return 'expired'
