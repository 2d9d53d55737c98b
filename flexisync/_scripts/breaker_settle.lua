-- include: breaker_lib
-- breaker_settle: the outcome of a half-open probe. success_threshold successful probes
-- close the breaker; a failed probe reopens it for exactly the provider's retry-after
-- when it carries one (the backoff period open_ms is left as it is), else for twice
-- the backoff period (capped at max_recovery_timeout).
-- (KEYS and ARGV[1] as in breaker_lib.lua.)
-- ARGV[2]  probe token
-- ARGV[3]  outcome: "ok", "fail" or "neutral" (an ignored exception: frees the slot)
-- ARGV[4]  success_threshold
-- ARGV[5]  recovery_timeout in ms
-- ARGV[6]  max_recovery_timeout in ms
-- ARGV[7]  provider's retry-after in ms ("" for none)
-- Returns snapshot.
if ARGV[2] == '' or #ARGV[2] > 64 then reject('ARGV[2] must be a probe token') end
local outcome = arg_word(3, {ok = true, fail = true, neutral = true})
local needed = arg_int(4, 1, 1000000)
local recovery = arg_int(5, 1, MAX_MS)
local longest = arg_int(6, 1, MAX_MS)
local retry_ms = arg_ms_or_nil(7)
check_record(true)
local held = redis.call('ZREM', P, ARGV[2])
local st = state_now()
if st ~= 'half_open' then
  -- The state moved on (reset, trip...) while the probe ran: its result is stale, but
  -- a provider's retry-after still may only extend an open period.
  if outcome == 'fail' and retry_ms and st == 'open' and open_for(retry_ms) then
    return publish(st)
  end
  return snapshot(st)
end
if outcome == 'ok' then
  local ok = redis.call('HINCRBY', H, 'probe_ok', 1)
  if ok >= needed then close() end
  return publish(st)  -- closed, or a probe slot is free: waiting processes may ask again
end
if outcome == 'fail' then
  local period = retry_ms
  if not period then
    period = math.min(num('open_ms', recovery) * 2, longest)
    redis.call('HSET', H, 'open_ms', period)
  end
  open_for(period)
  return publish(st)
end
if held == 1 then return publish(st) end
return snapshot(st)
