-- include: lock_lib
-- lock_release: give up a lease if (and only if) this owner still holds it, and wake
-- the waiters.
-- KEYS[1]  the lease
-- KEYS[2]  fair mode only: waiter queue (ZSET); KEYS[3] its expiries (ZSET)
-- ARGV[1]  the owner token
-- ARGV[2]  the lock's wake-up channel
-- Fair mode is on when KEYS[2] is given.
-- Returns "released", "expired" (no lease: it lapsed or was deleted) or "taken"
-- (another owner holds it now). The wake-up message is the token of the queue head
-- that may take the lock next (fair mode), else "".
local current = redis.call('GET', KEYS[1])
if current ~= ARGV[1] then
  if current then return 'taken' end
  return 'expired'
end
redis.call('DEL', KEYS[1])
local message = ''
if #KEYS == 3 then
  prune_queue(KEYS[2], KEYS[3])
  message = redis.call('ZRANGE', KEYS[2], 0, 0)[1] or ''
end
redis.call('PUBLISH', ARGV[2], message)
return 'released'
