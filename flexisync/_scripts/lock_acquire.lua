-- include: lock_lib
-- lock_acquire: take a lock's lease and its next fencing token in one round trip; a
-- caller that will wait joins the lock's waiter queue when it does not get the lease.
-- KEYS[1]  the lease (string; value = the owner token, or "~token" while a fair lock
--          is reserved for the queue head named token)
-- KEYS[2]  the fencing counter (string; see next_fence in lock_lib)
-- KEYS[3]  this token's tombstone (string, written by lock_abandon / lock_release), read
--          only: an attempt whose token was abandoned (its caller gave up: a lost reply,
--          a cancelled task) before this command arrived takes nothing
-- KEYS[4]  the waiter queue (ZSET token -> arrival, server microseconds); default mode:
--          ns:lock:{name}:waiters, fair mode: ns:lock:{name}:queue
-- ARGV[1]  the owner token of this acquisition
-- ARGV[2]  lease TTL in milliseconds
-- ARGV[3]  fencing counter TTL in milliseconds
-- ARGV[4]  queue flags, a sum: 1 = join the queue (or keep it alive) when the lease is
--          not taken; 2 = the caller may be queued: leave the queue when it is taken;
--          4 = join at the front (a waiter a release named, that lost the lock to a
--          newcomer, keeps its turn)
-- ARGV[5]  milliseconds the queue key lives after a waiter joined or re-checked
-- ARGV[6]  "1": fair mode, else default mode
-- ARGV[7]  fair mode: milliseconds a free lock stays reserved for the named queue head
-- ARGV[8]  fair mode: the lock's wake-up channel
-- Returns {1, fencing_token} when the lease is ours (also when it already was: a
-- retried call after a lost reply), else {0, pttl}: pttl = ms the holder's lease (or
-- the head's reservation) has left, -1 when it has no expiry, 0 when unknown (the
-- token was abandoned).
-- Default mode: a free lock goes to whoever comes (barging is allowed); a waiter only
-- competes when a release names it. Fair mode: a free lock goes to the queue head; found
-- free with another head (its holder crashed, or a reservation lapsed) it is reserved
-- for that head, which is woken.
-- All or nothing: when the fencing counter holds foreign data it returns an error and
-- leaves no lease behind.
local token = ARGV[1]
local flags = tonumber(ARGV[4] or '0')  -- (absent: no queue flags)
local join = flags % 2 == 1
local leave = math.floor(flags / 2) % 2 == 1
local front = flags >= 4

local function taken(fence, err)
  if not fence then
    return redis.error_reply(err)
  end
  if leave then
    redis.call('ZREM', KEYS[4], token)
  end
  return {1, fence}
end

local function missed()
  if join then
    enqueue(KEYS[4], token, ARGV[5], front)
  end
  return {0, redis.call('PTTL', KEYS[1])}
end

if ARGV[6] ~= '1' then
  if redis.call('GET', KEYS[3]) == token then
    return {0, 0}
  end
  local current = redis.call('SET', KEYS[1], token, 'NX', 'PX', ARGV[2], 'GET')
  if not current then
    local fence, err = next_fence(KEYS[2], ARGV[3])
    if not fence then
      redis.call('DEL', KEYS[1])
    end
    return taken(fence, err)
  end
  if current == token then
    return {1, tonumber(redis.call('GET', KEYS[2]) or '0')}
  end
  return missed()
end

local current = redis.call('GET', KEYS[1])
if current == token then
  return {1, tonumber(redis.call('GET', KEYS[2]) or '0')}
end
if not current then
  local head = redis.call('ZRANGE', KEYS[4], 0, 0)[1]
  if head and head ~= token then
    redis.call('ZREM', KEYS[4], head)
    redis.call('SET', KEYS[1], '~' .. head, 'PX', ARGV[7])
    redis.call('PUBLISH', ARGV[8], head)
    current = '~' .. head
  elseif head == token then
    leave = true
  end
end
if current and current ~= '~' .. token then
  return missed()
end
if redis.call('GET', KEYS[3]) == token then
  return {0, 0}
end
local fence, err = next_fence(KEYS[2], ARGV[3])
if fence then
  redis.call('SET', KEYS[1], token, 'PX', ARGV[2])
end
return taken(fence, err)
