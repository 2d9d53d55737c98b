-- include: breaker_lib
-- breaker_record: count outcomes one process saw while the breaker was closed; opens it
-- when the policy says so. Successes arrive aggregated (at most every 100 ms, or with
-- the next failure of the same process); failures arrive one per call.
-- (KEYS and ARGV[1] as in breaker_lib.lua.)
-- ARGV[2]  mode: "count" (consecutive failures) or "rate" (failure ratio over a window)
-- ARGV[3]  failure_threshold (count mode)
-- ARGV[4]  failure_rate in (0, 1] (rate mode)
-- ARGV[5]  minimum_calls (rate mode)
-- ARGV[6]  window in ms (rate mode)
-- ARGV[7]  recovery_timeout in ms: the first open period
-- ARGV[8]  successes reported (all made before the failure reported with them)
-- ARGV[9]  failures reported (0 or 1)
-- ARGV[10] provider's retry-after in ms ("" for none): open at once for that long
-- Returns snapshot followed by {window_calls, window_failures}.
local mode = ARGV[2]
local successes, failures = tonumber(ARGV[8]), tonumber(ARGV[9])
local st = get('state', 'closed')

if ARGV[10] ~= '' then
  if open_for(tonumber(ARGV[10])) then
    redis.call('HSETNX', H, 'open_ms', ARGV[7])
    return with_extra(publish(), 0, 0)
  end
  return with_extra(snapshot(), 0, 0)
end
if st ~= 'closed' then
  -- A late outcome of a call admitted before the breaker left closed: not counted.
  return with_extra(snapshot(), 0, 0)
end

local before = num('failures', 0)
local calls, fails = 0, 0
local trip = false
if mode == 'count' then
  -- Successes reset the count, then the failure (if any) adds to it: within one process
  -- the order is exact; across processes a success counts from when it arrives.
  local count = before
  if successes > 0 then count = 0 end
  count = count + failures
  redis.call('HSET', H, 'failures', count)
  trip = count >= tonumber(ARGV[3])
else
  local window_ms = tonumber(ARGV[6])
  local bucket_ms = math.max(100, math.floor(window_ms / 20))
  local bucket = math.floor(NOW / bucket_ms) * bucket_ms
  if successes > 0 then redis.call('HINCRBY', W, bucket .. ':s', successes) end
  if failures > 0 then redis.call('HINCRBY', W, bucket .. ':f', failures) end
  redis.call('PEXPIRE', W, window_ms + bucket_ms)
  calls, fails = window_totals(window_ms, true)
  redis.call('HSET', H, 'failures', fails)
  trip = failures > 0 and calls >= tonumber(ARGV[5])
         and fails >= tonumber(ARGV[4]) * calls
end

if trip then
  redis.call('HSET', H, 'open_ms', ARGV[7])
  open_for(tonumber(ARGV[7]))
  return with_extra(publish(), calls, fails)
end
local after = num('failures', 0)
if (before == 0) ~= (after == 0) then
  -- Mirrors learn whether failures are pending, so that processes flush their
  -- successes only while a success could matter.
  return with_extra(publish(), calls, fails)
end
redis.call('PEXPIRE', H, KEEP_MS)
return with_extra(snapshot(), calls, fails)
