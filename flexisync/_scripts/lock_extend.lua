-- lock_extend: reset a lease's TTL if (and only if) this owner still holds it.
-- Idempotent: a retry after a lost reply extends again and answers "extended".
-- KEYS[1]  the lease
-- KEYS[2]  this token's release marker (string, written by lock_release), read only
-- ARGV[1]  the owner token
-- ARGV[2]  the new TTL in milliseconds
-- Returns "extended", "released" (this owner released it: a renewal that raced the
-- release: nothing was lost), "expired" (no lease: it lapsed or was deleted) or "taken".
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 'extended'
end
if redis.call('GET', KEYS[2]) == ARGV[1] then return 'released' end
if current then return 'taken' end
return 'expired'
