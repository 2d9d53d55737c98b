-- include: lock_lib
-- lock_release: give up a lease if (and only if) this owner still holds it, remember
-- that it did, and wake the waiters. Idempotent per owner token: a retry after a lost
-- reply answers "released" again.
-- KEYS[1]  the lease
-- KEYS[2]  this token's release marker (string; set here, expires after ARGV[3] ms)
-- KEYS[3]  fair mode only: waiter queue (ZSET); KEYS[4] its expiries (ZSET)
-- ARGV[1]  the owner token
-- ARGV[2]  the lock's wake-up channel
-- ARGV[3]  milliseconds the release is remembered (longer than the client retries)
-- Fair mode is on when KEYS[3] is given.
-- Returns "released" (now, or by an earlier attempt with this token), "expired" (no
-- lease: it lapsed or was deleted) or "taken" (another owner holds it now). The
-- wake-up message is the token of the queue head that may take the lock next (fair
-- mode), else "".
local current = redis.call('GET', KEYS[1])
if current ~= ARGV[1] then
  if redis.call('GET', KEYS[2]) == ARGV[1] then return 'released' end
  if current then return 'taken' end
  return 'expired'
end
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[3])
local message = ''
if #KEYS == 4 then
  prune_queue(KEYS[3], KEYS[4])
  message = redis.call('ZRANGE', KEYS[3], 0, 0)[1] or ''
end
redis.call('PUBLISH', ARGV[2], message)
return 'released'
