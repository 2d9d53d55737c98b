-- include: lock_lib
-- lock_release: give up a lease if (and only if) this owner still holds it, remember
-- that it did, and wake who may take it next (name_waiters in lock_lib). Idempotent per
-- owner token: a retry after a lost reply answers "released" again.
-- KEYS[1]  the lease
-- KEYS[2]  this token's release marker (string; set here, expires after ARGV[3] ms)
-- KEYS[3]  the waiter queue (ZSET; ns:lock:{name}:waiters, fair: ns:lock:{name}:queue)
-- ARGV[1]  the owner token
-- ARGV[2]  the lock's wake-up channel
-- ARGV[3]  milliseconds the release is remembered (longer than the client retries)
-- ARGV[4]  "1": fair mode, else default mode
-- ARGV[5]  fair mode: milliseconds the lock stays reserved for the named queue head
-- Returns {outcome, queued}: outcome "released" (now, or by an earlier attempt with
-- this token), "expired" (no lease: it lapsed or was deleted) or "taken" (another owner
-- holds it now); queued 1 when the release named a queued waiter, else 0. The
-- wake-up message: default mode "first ~backup" (or "first"), fair mode the head's
-- token; "" when nobody queued.
local current = redis.call('GET', KEYS[1])
if current ~= ARGV[1] then
  if redis.call('GET', KEYS[2]) == ARGV[1] then return {'released', 0} end
  if current then return {'taken', 0} end
  return {'expired', 0}
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[3])
return {'released', name_waiters(KEYS[3], ARGV[4] == '1', ARGV[5], KEYS[1], ARGV[2])}
