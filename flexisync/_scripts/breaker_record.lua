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
local mode = arg_word(2, {count = true, rate = true})
local threshold = arg_int(3, 1, 1000000000)
local rate = tonumber(ARGV[4])
if not rate or not (rate >= 0 and rate <= 1) then reject('ARGV[4] must be a rate in [0, 1]') end
local minimum = arg_int(5, 1, 1000000000)
local window_ms = arg_int(6, 1, MAX_MS)
local recovery = arg_int(7, 1, MAX_MS)
local successes = arg_int(8, 0, LIMIT)
local failures = arg_int(9, 0, 1)
local retry_ms = arg_ms_or_nil(10)
check_record(mode == 'rate')
local st = state_now()

if retry_ms then
  if open_for(retry_ms) then
    redis.call('HSETNX', H, 'open_ms', recovery)
    return with_extra(publish(st), 0, 0)
  end
  return with_extra(snapshot(st), 0, 0)
end
if st ~= 'closed' then
  -- A late outcome of a call admitted before the breaker left closed: not counted.
  return with_extra(snapshot(st), 0, 0)
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
  trip = count >= threshold
else
  local bucket_ms = math.max(100, math.floor(window_ms / 20))
  local bucket = math.floor(NOW / bucket_ms) * bucket_ms
  if successes > 0 then redis.call('HINCRBY', W, bucket .. ':s', successes) end
  if failures > 0 then redis.call('HINCRBY', W, bucket .. ':f', failures) end
  redis.call('PEXPIRE', W, window_ms + bucket_ms)
  calls, fails = window_totals(window_ms, true)
  redis.call('HSET', H, 'failures', fails)
  trip = failures > 0 and calls >= minimum and fails >= rate * calls
end

if trip then
  redis.call('HSET', H, 'open_ms', recovery)
  open_for(recovery)
  return with_extra(publish(st), calls, fails)
end
local after = num('failures', 0)
if (before == 0) ~= (after == 0) then
  -- Mirrors learn whether failures are pending, so that processes flush their
  -- successes only while a success could matter.
  return with_extra(publish(st), calls, fails)
end
keep()
return with_extra(snapshot(st), calls, fails)
