-- lock_lib: helpers included by lock_acquire.lua and lock_release.lua (never run alone).
-- prune_queue(queue, expiries): drop fair-mode waiters whose entry expired (dead waiters)
--   queue     ZSET token -> arrival time (microseconds)
--   expiries  ZSET token -> expiry (server milliseconds)
-- Returns the server's TIME reply and the time in milliseconds.
local function prune_queue(queue, expiries)
  local t = redis.call('TIME')
  local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local expired = redis.call('ZRANGEBYSCORE', expiries, '-inf', now_ms)
  if #expired > 0 then
    redis.call('ZREM', queue, unpack(expired))
    redis.call('ZREMRANGEBYSCORE', expiries, '-inf', now_ms)
  end
  return t, now_ms
end
