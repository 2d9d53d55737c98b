-- breaker_lib: helpers included by every other breaker_*.lua script (never run alone).
-- Every breaker script takes the same keys:
-- KEYS[1]  the breaker's state HASH: state, version, epoch, failures, open_until,
--          open_ms (the backoff period: recovery_timeout, doubled by each failed probe
--          without a retry-after), period_ms (the length of the open period running:
--          open_until - opened_at), opened_at, probe_ok, trips, changed_at
-- KEYS[2]  the failure-rate window HASH: "<bucket>:s" / "<bucket>:f" -> counts
-- KEYS[3]  the half-open probe leases ZSET: token -> lease expiry (server ms)
-- and ARGV[1] is always the channel transitions are PUBLISHed on.
-- All times are the Redis server's clock in milliseconds (TIME), never a worker's.
--
-- Every script is all-or-nothing: it checks its arguments (arg_*) and the stored
-- record (check_record) before its first write, and fails with an error reply and no
-- change otherwise. A record another program damaged fails with an error reply
-- starting "FLEXISYNC_MALFORMED" (fixed by breaker_repair.lua).
local H, W, P, CHANNEL = KEYS[1], KEYS[2], KEYS[3], ARGV[1]
local T = redis.call('TIME')
local NOW = tonumber(T[1]) * 1000 + math.floor(tonumber(T[2]) / 1000)
-- An automatic state's record is dropped this long after its last change; a manual
-- state (forced_open, disabled) never expires.
local KEEP_MS = 7 * 24 * 3600 * 1000
-- The longest duration any argument may carry: 10 years (flexisync.breaker.MAX_DURATION).
local MAX_MS = 10 * 365 * 24 * 3600 * 1000
-- Stored integers stay well inside what a double holds exactly and what Lua prints
-- without an exponent.
local LIMIT = 1e13
local STATES = {closed = true, open = true, half_open = true, forced_open = true,
                disabled = true}
local INTEGER_FIELDS = {version = true, failures = true, open_until = true, open_ms = true,
                        period_ms = true, opened_at = true, probe_ok = true, trips = true,
                        changed_at = true}

-- Errors are raised as strings (a table is not understood by every server flexisync
-- supports, e.g. fakeredis for memory://).
local function reject(message)
  error('flexisync breaker script: ' .. message)
end

local function is_int(v, lo, hi)
  local n = tonumber(v)
  return n ~= nil and n == math.floor(n) and n >= lo and n <= hi
end

-- ARGV[i] as an integer in [lo, hi]; an error reply (before any write) otherwise.
local function arg_int(i, lo, hi)
  if not is_int(ARGV[i], lo, hi) then
    reject('ARGV[' .. i .. '] must be an integer from ' .. lo .. ' to ' .. hi)
  end
  return tonumber(ARGV[i])
end

-- ARGV[i] as milliseconds in [1, MAX_MS], or nil for "".
local function arg_ms_or_nil(i)
  if ARGV[i] == '' then return nil end
  return arg_int(i, 1, MAX_MS)
end

-- ARGV[i] as one of the strings in `allowed` (a set).
local function arg_word(i, allowed)
  if not allowed[ARGV[i]] then reject('ARGV[' .. i .. '] is not a known word') end
  return ARGV[i]
end

-- What is wrong with the stored record: a list of short descriptions (empty = sound).
-- Names only fields flexisync owns, never the foreign values themselves. The window
-- and probes keys are checked only when `aux` is true (the script reads them; a DEL
-- works on any type). One command per key when all is well: this runs before every
-- script.
local function defects(aux)
  local found = {}
  local flat = redis.pcall('HGETALL', H)
  if flat.err then
    found[#found + 1] = 'the state key holds a ' .. redis.call('TYPE', H).ok .. ', not a hash'
  else
    for i = 1, #flat, 2 do
      local f, v = flat[i], flat[i + 1]
      if INTEGER_FIELDS[f] then
        if not is_int(v, -LIMIT, LIMIT) then
          found[#found + 1] = 'field ' .. f .. ' is not an integer in range'
        end
      elseif f == 'state' then
        if not STATES[v] then found[#found + 1] = 'field state is not a state' end
      elseif f == 'epoch' then
        if #v > 64 or not string.match(v, '^[%w%.%-_]+$') then
          found[#found + 1] = 'field epoch is not a token'
        end
      end
    end
  end
  if not aux then return found end
  local counts = redis.pcall('HVALS', W)
  if counts.err then
    found[#found + 1] = 'the window key holds a ' .. redis.call('TYPE', W).ok .. ', not a hash'
  else
    for _, v in ipairs(counts) do
      if not is_int(v, -LIMIT, LIMIT) then
        found[#found + 1] = 'a window count is not an integer in range'
        break
      end
    end
  end
  local beyond = redis.pcall('ZCOUNT', P, '(' .. (NOW + MAX_MS), '+inf')
  if type(beyond) == 'table' and beyond.err then
    found[#found + 1] = 'the probes key holds a ' .. redis.call('TYPE', P).ok .. ', not a sorted set'
  elseif beyond > 0 then
    found[#found + 1] = 'a probe lease ends beyond any lease flexisync grants'
  end
  return found
end

-- Fails (before any write) when the record is damaged; `aux`: also check the window
-- and probes keys (scripts that read them).
local function check_record(aux)
  local found = defects(aux)
  if #found > 0 then
    error('FLEXISYNC_MALFORMED ' .. table.concat(found, '; '))
  end
end

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

-- The state when the script started (after check_record): replies carry it, so that
-- the process whose script made a transition knows it did.
local function state_now()
  return get('state', 'closed')
end

-- Milliseconds until a probe may be admitted: 0 when not open, -1 for forced_open.
local function remaining()
  local st = get('state', 'closed')
  if st == 'open' then return math.max(0, num('open_until', NOW) - NOW) end
  if st == 'forced_open' then return -1 end
  return 0
end

-- The record's expiry: none for a manual state (it lasts until changed), else
-- KEEP_MS after the end of any open period.
local function keep()
  local st = get('state', 'closed')
  if st == 'forced_open' or st == 'disabled' then
    redis.call('PERSIST', H)
    return
  end
  local ms = KEEP_MS
  local left = remaining()
  if left > 0 then ms = ms + left end
  redis.call('PEXPIRE', H, ms)
end

-- The epoch identifies one life of the hash: a mirror accepts any version of a new
-- epoch (the server lost its data), and only newer versions within one epoch.
local function epoch()
  local e = redis.call('HGET', H, 'epoch')
  if not e then
    e = T[1] .. '.' .. T[2]
    redis.call('HSET', H, 'epoch', e)
    keep()  -- this may have created the hash: it must not outlive its use
  end
  return e
end

-- {epoch, version, state, remaining_ms, failures, before}: what every script replies
-- first; `before` is the state the script started from.
local function snapshot(before)
  return {epoch(), num('version', 0), get('state', 'closed'), remaining(),
          num('failures', 0), before}
end

-- Bump the version and publish the snapshot; every mirror applies it once.
local function publish(before)
  redis.call('HINCRBY', H, 'version', 1)
  redis.call('HSET', H, 'changed_at', NOW)
  local s = snapshot(before)
  redis.call('PUBLISH', CHANNEL, s[1] .. ' ' .. s[2] .. ' ' .. s[3] .. ' ' .. s[4] .. ' ' .. s[5])
  keep()
  return s
end

-- Open now for `ms` (period_ms records the open period's real length); never shortens
-- an open period already running (extending one lengthens period_ms).
-- Returns true when the state changed (the caller publishes).
local function open_for(ms)
  local st = get('state', 'closed')
  if st == 'forced_open' or st == 'disabled' then return false end
  local target = NOW + ms
  if st == 'open' and num('open_until', 0) >= target then return false end
  local opened_at = NOW
  if st ~= 'open' then
    redis.call('HINCRBY', H, 'trips', 1)
    redis.call('HSET', H, 'opened_at', NOW)
  else
    opened_at = math.min(NOW, num('opened_at', NOW))
  end
  redis.call('HSET', H, 'state', 'open', 'open_until', target, 'probe_ok', 0,
             'period_ms', target - opened_at)
  redis.call('DEL', P)
  return true
end

-- Back to closed with a clean slate (the next open period starts from recovery_timeout).
local function close()
  redis.call('HSET', H, 'state', 'closed', 'failures', 0, 'probe_ok', 0)
  redis.call('HDEL', H, 'open_ms', 'open_until', 'period_ms')
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
