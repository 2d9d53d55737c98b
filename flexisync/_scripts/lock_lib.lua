-- lock_lib: helpers included by the lock_*.lua scripts (never run alone).
--
-- prune_queue(queue, expiries): drop fair-mode waiters whose entry expired (dead waiters)
--   queue     ZSET token -> arrival time (microseconds)
--   expiries  ZSET token -> expiry (server milliseconds)
--   Returns the server's TIME reply and the time in milliseconds.
--
-- next_fence(fence, ttl_ms): issue the next fencing token and return it, or nil and an
--   error message when `fence` cannot count (foreign data, a refused command; then
--   nothing is written). The counter counts up by one and its TTL (ttl_ms) is refreshed
--   on every acquire; when the key is missing (first use, expired after an idle period, lost with
--   the server's data) it starts again from the server's TIME in microseconds, not 1.
--   Since a lock cannot be acquired more than once per microsecond, the counter never
--   runs ahead of that clock, so a restarted counter is larger than every token issued
--   before, as long as the server's clock does not go back by more than the time since
--   the last acquire. 2^53 microseconds is year 2255: tokens are exact in Lua and JSON.

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

local function next_fence(fence, ttl_ms)
  local token = redis.pcall('INCRBY', fence, 1)
  if type(token) == 'table' then  -- WRONGTYPE, not an integer, NOPERM...
    return nil, 'fencing counter ' .. fence .. ' cannot count: ' .. tostring(token.err)
  end
  if token >= 9007199254740991 then  -- foreign data: beyond what a token can be
    redis.call('INCRBY', fence, -1)
    return nil, 'fencing counter ' .. fence .. ' holds a value beyond any token'
  end
  if token == 1 then
    local t = redis.call('TIME')
    token = tonumber(t[1]) * 1000000 + tonumber(t[2])
    redis.call('SET', fence, string.format('%.0f', token), 'PX', ttl_ms)
  else
    redis.call('PEXPIRE', fence, ttl_ms)
  end
  return token
end
