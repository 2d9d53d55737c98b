-- include: lock_lib
-- lock_abandon: drop everything one acquire attempt may have left, after its outcome
-- is unknown (the reply was lost, the call timed out) or the wait ended: the lease if
-- that token holds it (then waiters are woken as by a release), and its fair-mode queue
-- entry. Idempotent.
-- KEYS[1]  the lease
-- KEYS[2]  fair mode only: waiter queue (ZSET); KEYS[3] its expiries (ZSET)
-- ARGV[1]  the owner token of the attempt
-- ARGV[2]  the lock's wake-up channel
-- Fair mode is on when KEYS[2] is given.
-- Returns 1 when a lease was dropped, else 0.
local dropped = 0
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  dropped = 1
end
local message = ''
if #KEYS == 3 then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
  if dropped == 1 then
    prune_queue(KEYS[2], KEYS[3])
    message = redis.call('ZRANGE', KEYS[2], 0, 0)[1] or ''
  end
end
if dropped == 1 then
  redis.call('PUBLISH', ARGV[2], message)
end
return dropped
