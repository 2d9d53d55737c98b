-- include: breaker_lib
-- breaker_settle: the outcome of a half-open probe. success_threshold successful probes
-- close the breaker; a failed probe reopens it for twice the last open period (capped),
-- or for the provider's retry-after if that is longer.
-- (KEYS and ARGV[1] as in breaker_lib.lua.)
-- ARGV[2]  probe token
-- ARGV[3]  outcome: "ok", "fail" or "neutral" (an ignored exception: frees the slot)
-- ARGV[4]  success_threshold
-- ARGV[5]  recovery_timeout in ms
-- ARGV[6]  max_recovery_timeout in ms
-- ARGV[7]  provider's retry-after in ms ("" for none)
-- Returns snapshot.
local held = redis.call('ZREM', P, ARGV[2])
local st = get('state', 'closed')
local outcome = ARGV[3]
if st ~= 'half_open' then
  -- The state moved on (reset, trip...) while the probe ran: its result is stale, but
  -- a provider's retry-after still may only extend an open period.
  if outcome == 'fail' and ARGV[7] ~= '' and st == 'open' and open_for(tonumber(ARGV[7])) then
    return publish()
  end
  return snapshot()
end
if outcome == 'ok' then
  local ok = redis.call('HINCRBY', H, 'probe_ok', 1)
  if ok >= tonumber(ARGV[4]) then close() end
  return publish()  -- closed, or a probe slot is free: waiting processes may ask again
end
if outcome == 'fail' then
  local period = math.min(num('open_ms', tonumber(ARGV[5])) * 2, tonumber(ARGV[6]))
  redis.call('HSET', H, 'open_ms', period)
  if ARGV[7] ~= '' then period = math.max(period, tonumber(ARGV[7])) end
  open_for(period)
  return publish()
end
if held == 1 then return publish() end
return snapshot()
