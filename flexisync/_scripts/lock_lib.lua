-- lock_lib: helpers included by the lock_*.lua scripts (never run alone).
--
-- prune_queue(queue, expiries): drop queued waiters whose entry expired (dead waiters);
--   used by the semaphore scripts.
--   queue     ZSET token -> arrival time (microseconds)
--   expiries  ZSET token -> expiry (server milliseconds)
--   Returns the server's TIME reply and the time in milliseconds.
--
-- enqueue(queue, token, ttl_ms, front): put a waiter in its lock's queue (ZSET token ->
--   arrival, server microseconds; with `front`, ahead of everybody) unless it is there
--   already (it keeps its place), and keep the queue alive ttl_ms (every waiter's
--   periodic re-check does this again).
--
-- name_waiters(queue, fair, reserve_ms, lease, channel): after the lease was given up,
--   wake who may take it next. Default mode: the oldest waiter is named and leaves the
--   queue; the next one is named as a backup ("~token": it tries only if no other
--   wake-up follows within a short delay, so a dead first waiter stalls nothing for
--   long) and keeps its place. Fair mode: the head leaves the queue and the lease is
--   reserved for it ("~token", expiring after reserve_ms: a dead head loses its turn).
--   An empty queue publishes "" (everybody, including clients that do not queue, tries
--   again). The message is published on `channel`. Returns 1 when it named a waiter,
--   else 0.
--
-- next_fence(fence, ttl_ms): issue the next fencing token and return it, or nil and an
--   error message when `fence` cannot count (foreign data, a refused command; then
--   nothing is written). The counter counts up by one; when the key is missing (first
--   use, expired, lost with the server's data) it starts again from the server's TIME
--   in microseconds, not 1, and gets a TTL of ttl_ms, which every 1024th token
--   refreshes. Since a lock cannot be acquired more than once per microsecond, the
--   counter never runs ahead of that clock, so a restarted counter is larger than every
--   token issued before, as long as the server's clock does not go back by more than the
--   time since the counter (re)started minus the acquisitions since. 2^53 microseconds
--   is year 2255: tokens are exact in Lua and JSON.

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

local function enqueue(queue, token, ttl_ms, front)
  local arrival
  if front then
    arrival = tonumber(redis.call('ZRANGE', queue, 0, 0, 'WITHSCORES')[2])
    if arrival then
      arrival = arrival - 1
    end
  end
  if not arrival then
    local t = redis.call('TIME')
    arrival = tonumber(t[1]) * 1000000 + tonumber(t[2])
  end
  redis.call('ZADD', queue, 'NX', arrival, token)
  redis.call('PEXPIRE', queue, ttl_ms)
end

local function name_waiters(queue, fair, reserve_ms, lease, channel)
  local message = ''
  local named = 0
  if fair then
    local head = redis.call('ZPOPMIN', queue)[1]
    if head then
      redis.call('SET', lease, '~' .. head, 'PX', reserve_ms)
      message = head
      named = 1
    else
      redis.call('DEL', lease)
    end
  else
    redis.call('DEL', lease)
    local first = redis.call('ZRANGE', queue, 0, 1)
    if first[1] then
      redis.call('ZREM', queue, first[1])
      message = first[1]
      named = 1
      if first[2] then
        message = message .. ' ~' .. first[2]
      end
    end
  end
  redis.call('PUBLISH', channel, message)
  return named
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
  elseif token % 1024 == 0 then
    redis.call('PEXPIRE', fence, ttl_ms)
  end
  return token
end
