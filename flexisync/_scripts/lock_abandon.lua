-- include: lock_lib
-- lock_abandon: drop everything one acquire attempt may have left, after its outcome
-- is unknown (the reply was lost, the call timed out, the task was cancelled) or the
-- wait ended: the lease (or a fair lock's reservation) if that token holds it, then
-- waking who may take it next as a release does, and its queue entry; and leave a
-- tombstone for the token, so that the attempt's command, should it still be in
-- flight, takes nothing when it lands. A waiter that leaves while the lock is free and
-- others wait (it may have been the one a release named) wakes the next one. Idempotent.
-- KEYS[1]  the lease
-- KEYS[2]  the token's tombstone / release marker (string; set here, expires after ARGV[3] ms)
-- KEYS[3]  the waiter queue (ZSET; ns:lock:{name}:waiters, fair: ns:lock:{name}:queue)
-- ARGV[1]  the owner token of the attempt
-- ARGV[2]  the lock's wake-up channel
-- ARGV[3]  milliseconds the tombstone is kept (longer than the client retries)
-- ARGV[4]  "1": fair mode, else default mode
-- ARGV[5]  fair mode: milliseconds the lock stays reserved for the named queue head
-- Returns 1 when a lease was dropped, else 0.
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[3])
redis.call('ZREM', KEYS[3], ARGV[1])
local current = redis.call('GET', KEYS[1])
local dropped = 0
if current == ARGV[1] then
  dropped = 1
end
if current == ARGV[1] or current == '~' .. ARGV[1] or
    (not current and redis.call('EXISTS', KEYS[3]) == 1) then
  name_waiters(KEYS[3], ARGV[4] == '1', ARGV[5], KEYS[1], ARGV[2])
end
return dropped
