-- include: lock_lib
-- semaphore_acquire: take one of a semaphore's `limit` slots, first come first served.
-- KEYS[1]  the holders (ZSET owner token -> lease expiry, server milliseconds)
-- KEYS[2]  the waiter queue (ZSET token -> arrival time, microseconds)
-- KEYS[3]  the waiter expiries (ZSET token -> expiry, server milliseconds)
-- KEYS[4]  this token's marker (string, written by semaphore_release / _abandon), read
--          only: an attempt whose token was given up before this command arrived
--          takes nothing
-- ARGV[1]  the owner token of this acquisition
-- ARGV[2]  the limit (at most this many live holders)
-- ARGV[3]  lease in milliseconds
-- ARGV[4]  "1" when the caller will wait (join, or refresh its entry in, the queue)
-- ARGV[5]  milliseconds a queue entry lives unless refreshed
-- Holders whose lease ran out and waiters whose entry expired are dropped first (dead
-- processes). A slot is granted when fewer than `limit` live holders exist and fewer
-- waiters than free slots arrived before this token (a caller not in the queue counts
-- every queued waiter as ahead of it).
-- Returns {1, 0} when the slot is ours (also when it already was: a retry after a lost
-- reply), else {0, ms}: ms until the earliest holder's lease ends, 0 when a slot is
-- free but reserved for waiters ahead (or the token was given up).
local token = ARGV[1]
if redis.call('EXISTS', KEYS[4]) == 1 then
  return {0, 0}
end
local t, now_ms = prune_queue(KEYS[2], KEYS[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
if redis.call('ZSCORE', KEYS[1], token) then
  return {1, 0}
end
local lease = tonumber(ARGV[3])
local free = tonumber(ARGV[2]) - redis.call('ZCARD', KEYS[1])
-- Waiters ahead of this token (ZSCORE + ZCOUNT rather than ZRANK: the documented ACL
-- allows these); one that arrived in the same microsecond does not count as ahead.
local arrived = redis.call('ZSCORE', KEYS[2], token)
local ahead
if arrived then
  ahead = redis.call('ZCOUNT', KEYS[2], '-inf', '(' .. arrived)
else
  ahead = redis.call('ZCARD', KEYS[2])
end
if free > ahead then
  redis.call('ZADD', KEYS[1], now_ms + lease, token)
  if redis.call('PTTL', KEYS[1]) < lease then
    redis.call('PEXPIRE', KEYS[1], lease)
  end
  redis.call('ZREM', KEYS[2], token)
  redis.call('ZREM', KEYS[3], token)
  return {1, 0}
end
if ARGV[4] == '1' then
  local arrival = tonumber(t[1]) * 1000000 + tonumber(t[2])
  redis.call('ZADD', KEYS[2], 'NX', arrival, token)
  redis.call('ZADD', KEYS[3], now_ms + tonumber(ARGV[5]), token)
  redis.call('PEXPIRE', KEYS[2], 2 * tonumber(ARGV[5]))
  redis.call('PEXPIRE', KEYS[3], 2 * tonumber(ARGV[5]))
end
if free > 0 then
  return {0, 0}
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {0, math.max(tonumber(first[2]) - now_ms, 1)}
