-- include: lock_lib
-- lock_abandon: drop everything one acquire attempt may have left, after its outcome
-- is unknown (the reply was lost, the call timed out, the task was cancelled) or the
-- wait ended: the lease if that token holds it (then waiters are woken as by a
-- release), and its fair-mode queue entry; and leave a tombstone for the token, so that
-- the attempt's command, should it still be in flight, sets nothing when it lands.
-- Idempotent.
-- KEYS[1]  the lease
-- KEYS[2]  the token's tombstone / release marker (string; set here, expires after ARGV[3] ms)
-- KEYS[3]  fair mode only: waiter queue (ZSET); KEYS[4] its expiries (ZSET)
-- ARGV[1]  the owner token of the attempt
-- ARGV[2]  the lock's wake-up channel
-- ARGV[3]  milliseconds the tombstone is kept (longer than the client retries)
-- Fair mode is on when KEYS[3] is given.
-- Returns 1 when a lease was dropped, else 0.
local dropped = 0
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  dropped = 1
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[3])
local message = ''
if #KEYS == 4 then
  redis.call('ZREM', KEYS[3], ARGV[1])
  redis.call('ZREM', KEYS[4], ARGV[1])
  if dropped == 1 then
    prune_queue(KEYS[3], KEYS[4])
    message = redis.call('ZRANGE', KEYS[3], 0, 0)[1] or ''
  end
end
if dropped == 1 then
  redis.call('PUBLISH', ARGV[2], message)
end
return dropped
