-- include: breaker_lib
-- breaker_read: the breaker's shared state, without changing anything.
-- (KEYS and ARGV[1] as in breaker_lib.lua.)
-- ARGV[2]  window length in ms (for the failure-rate totals; "0" to skip them)
-- Returns snapshot (epoch "" when the breaker has no state yet) followed by
-- {trips, probes_in_flight, probe_ok, period_ms, window_calls, window_failures,
-- changed_at, ttl_ms} (ttl_ms -1: the record does not expire; period_ms: the length
-- of the open period running or last run, open_ms for a record written before it).
local window_ms = arg_int(2, 0, MAX_MS)
check_record(true)
if redis.call('EXISTS', H) == 0 then
  return {'', 0, 'closed', 0, 0, 'closed', 0, 0, 0, 0, 0, 0, 0, -2}
end
local calls, fails = 0, 0
if window_ms > 0 then calls, fails = window_totals(window_ms, false) end
local st = state_now()
local s = {get('epoch', ''), num('version', 0), st, remaining(), num('failures', 0), st}
return with_extra(s, num('trips', 0), redis.call('ZCOUNT', P, NOW, '+inf'),
                  num('probe_ok', 0), num('period_ms', num('open_ms', 0)), calls, fails,
                  num('changed_at', 0),
                  redis.call('PTTL', H))
