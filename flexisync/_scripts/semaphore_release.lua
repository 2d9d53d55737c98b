-- include: lock_lib
-- semaphore_release: give a slot back if (and only if) this owner still holds it,
-- remember that it did, and wake the waiters. Idempotent per owner token: a retry
-- after a lost reply answers "released" again.
-- KEYS[1]  the holders (ZSET token -> lease expiry, server milliseconds)
-- KEYS[2]  the waiter queue (ZSET); KEYS[3] its expiries (ZSET)
-- KEYS[4]  this token's marker (string; set here, expires after ARGV[3] ms)
-- ARGV[1]  the owner token
-- ARGV[2]  the semaphore's wake-up channel
-- ARGV[3]  milliseconds the release is remembered (longer than the client retries)
-- ARGV[4]  the limit
-- Returns "released" (now, or by an earlier attempt with this token) or "expired" (the
-- lease had run out, or the slot was removed). The wake-up message names the waiters
-- that may take a slot now (space-separated tokens, first come first), or is "" when
-- any waiter may try.
local _, now_ms = prune_queue(KEYS[2], KEYS[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then
  if redis.call('GET', KEYS[4]) == 'released' then return 'released' end
  return 'expired'
end
redis.call('SET', KEYS[4], 'released', 'PX', ARGV[3])
local free = tonumber(ARGV[4]) - redis.call('ZCARD', KEYS[1])
local message = ''
if free > 0 and free <= 16 then
  message = table.concat(redis.call('ZRANGE', KEYS[2], 0, free - 1), ' ')
end
redis.call('PUBLISH', ARGV[2], message)
return 'released'
