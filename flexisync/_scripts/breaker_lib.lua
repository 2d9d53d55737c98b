-- breaker_lib: helpers included by every other breaker_*.lua script (never run alone).
-- Every breaker script takes the same keys:
-- KEYS[1]  the breaker's state HASH: state, version, epoch, failures, open_until,
--          open_ms, opened_at, probe_ok, trips, changed_at
-- KEYS[2]  the failure-rate window HASH: "<bucket>:s" / "<bucket>:f" -> counts
-- KEYS[3]  the half-open probe leases ZSET: token -> lease expiry (server ms)
-- and ARGV[1] is always the channel transitions are PUBLISHed on.
-- All times are the Redis server's clock in milliseconds (TIME), never a worker's.
local H, W, P, CHANNEL = KEYS[1], KEYS[2], KEYS[3], ARGV[1]
local T = redis.call('TIME')
local NOW = tonumber(T[1]) * 1000 + math.floor(tonumber(T[2]) / 1000)
local KEEP_MS = 7 * 24 * 3600 * 1000

local function get(field, default)
  local v = redis.call('HGET', H, field)
  if v then return v end
  return default
end

local function num(field, default)
  local v = redis.call('HGET', H, field)
  if v then return tonumber(v) end
  return default
end

-- The epoch identifies one life of the hash: a mirror accepts any version of a new
-- epoch (the server lost its data), and only newer versions within one epoch.
local function epoch()
  local e = redis.call('HGET', H, 'epoch')
  if not e then
    e = T[1] .. '.' .. T[2]
    redis.call('HSET', H, 'epoch', e)
  end
  return e
end

-- Milliseconds until a probe may be admitted: 0 when not open, -1 for forced_open.
local function remaining()
  local st = get('state', 'closed')
  if st == 'open' then return math.max(0, num('open_until', NOW) - NOW) end
  if st == 'forced_open' then return -1 end
  return 0
end

-- {epoch, version, state, remaining_ms, failures}: what every script replies first.
local function snapshot()
  return {epoch(), num('version', 0), get('state', 'closed'), remaining(), num('failures', 0)}
end

-- Bump the version and publish the snapshot; every mirror applies it once.
local function publish()
  redis.call('HINCRBY', H, 'version', 1)
  redis.call('HSET', H, 'changed_at', NOW)
  local s = snapshot()
  redis.call('PUBLISH', CHANNEL, s[1] .. ' ' .. s[2] .. ' ' .. s[3] .. ' ' .. s[4] .. ' ' .. s[5])
  local keep = KEEP_MS
  if s[4] > 0 then keep = keep + s[4] end
  redis.call('PEXPIRE', H, keep)
  return s
end

-- Open now for at least `ms`; never shortens an open period already running.
-- Returns true when the state changed (the caller publishes).
local function open_for(ms)
  local st = get('state', 'closed')
  if st == 'forced_open' or st == 'disabled' then return false end
  local target = NOW + ms
  if st == 'open' and num('open_until', 0) >= target then return false end
  if st ~= 'open' then
    redis.call('HINCRBY', H, 'trips', 1)
    redis.call('HSET', H, 'opened_at', NOW)
  end
  redis.call('HSET', H, 'state', 'open', 'open_until', target, 'probe_ok', 0)
  redis.call('DEL', P)
  return true
end

-- Back to closed with a clean slate (the next open period starts from recovery_timeout).
local function close()
  redis.call('HSET', H, 'state', 'closed', 'failures', 0, 'probe_ok', 0)
  redis.call('HDEL', H, 'open_ms', 'open_until')
  redis.call('DEL', P, W)
end

-- Calls and failures counted in the failure-rate window (buckets newer than
-- NOW - window_ms); with `prune`, older buckets are deleted.
local function window_totals(window_ms, prune)
  local calls, fails = 0, 0
  local flat = redis.call('HGETALL', W)
  for i = 1, #flat, 2 do
    local bucket, kind = string.match(flat[i], '^(%d+):(%a)$')
    if bucket and tonumber(bucket) > NOW - window_ms then
      local n = tonumber(flat[i + 1])
      calls = calls + n
      if kind == 'f' then fails = fails + n end
    elseif prune then
      redis.call('HDEL', W, flat[i])
    end
  end
  return calls, fails
end

local function with_extra(s, ...)
  for _, v in ipairs({...}) do s[#s + 1] = v end
  return s
end
