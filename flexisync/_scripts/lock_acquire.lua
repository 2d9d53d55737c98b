-- include: lock_lib
-- lock_acquire: take a lock's lease and its next fencing token in one round trip.
-- KEYS[1]  the lease (string; value = the owner token)
-- KEYS[2]  the fencing counter (string; expires after ARGV[3] ms without an acquire)
-- KEYS[3]  this token's tombstone (string, written by lock_abandon / lock_release), read
--          only: an attempt whose token was abandoned (its caller gave up: a lost reply,
--          a cancelled task) before this command arrived sets nothing
-- KEYS[4]  fair mode only: waiter queue (ZSET token -> arrival time, microseconds)
-- KEYS[5]  fair mode only: waiter expiries (ZSET token -> expiry, server milliseconds)
-- ARGV[1]  the owner token of this acquisition
-- ARGV[2]  lease TTL in milliseconds
-- ARGV[3]  fencing counter TTL in milliseconds (refreshed on every acquire)
-- ARGV[4]  fair mode only: "1" when the caller will wait (join or refresh the queue)
-- ARGV[5]  fair mode only: milliseconds a queue entry lives unless refreshed
-- Fair mode is on when KEYS[4] is given.
-- Returns {1, fencing_token} when the lease is ours (also when it already was: a
-- retried call after a lost reply), else {0, pttl}: pttl = ms the holder's lease has
-- left, -1 when it has no expiry, 0 when the lock is free but reserved for the queue head
-- (or the token was abandoned).
-- All or nothing: when the fencing counter holds foreign data it returns an error and
-- leaves no lease behind.
local token = ARGV[1]
if redis.call('GET', KEYS[3]) == token then
  return {0, 0}
end
if #KEYS == 3 then
  if redis.call('SET', KEYS[1], token, 'NX', 'PX', ARGV[2]) then
    local fence, err = next_fence(KEYS[2], ARGV[3])
    if not fence then
      redis.call('DEL', KEYS[1])
      return redis.error_reply(err)
    end
    return {1, fence}
  end
  if redis.call('GET', KEYS[1]) == token then
    return {1, tonumber(redis.call('GET', KEYS[2]) or '0')}
  end
  return {0, redis.call('PTTL', KEYS[1])}
end
local current = redis.call('GET', KEYS[1])
if current == token then
  return {1, tonumber(redis.call('GET', KEYS[2]) or '0')}
end
local t, now_ms = prune_queue(KEYS[4], KEYS[5])
if not current then
  local head = redis.call('ZRANGE', KEYS[4], 0, 0)[1]
  if head == nil or head == token then
    local fence, err = next_fence(KEYS[2], ARGV[3])
    if not fence then
      return redis.error_reply(err)
    end
    redis.call('SET', KEYS[1], token, 'PX', ARGV[2])
    if head ~= nil then
      redis.call('ZREM', KEYS[4], token)
      redis.call('ZREM', KEYS[5], token)
    end
    return {1, fence}
  end
end
if ARGV[4] == '1' then
  local arrival = tonumber(t[1]) * 1000000 + tonumber(t[2])
  redis.call('ZADD', KEYS[4], 'NX', arrival, token)
  redis.call('ZADD', KEYS[5], now_ms + tonumber(ARGV[5]), token)
  redis.call('PEXPIRE', KEYS[4], 2 * tonumber(ARGV[5]))
  redis.call('PEXPIRE', KEYS[5], 2 * tonumber(ARGV[5]))
end
if not current then
  return {0, 0}
end
return {0, redis.call('PTTL', KEYS[1])}
