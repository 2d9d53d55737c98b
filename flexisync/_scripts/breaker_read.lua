-- include: breaker_lib
-- breaker_read: the breaker's shared state, without changing anything.
-- (KEYS and ARGV[1] as in breaker_lib.lua.)
-- ARGV[2]  window length in ms (for the failure-rate totals; "0" to skip them)
-- Returns snapshot (epoch "" when the breaker has no state yet) followed by
-- {trips, probes_in_flight, probe_ok, open_ms, window_calls, window_failures, changed_at}.
if redis.call('EXISTS', H) == 0 then
  return {'', 0, 'closed', 0, 0, 0, 0, 0, 0, 0, 0, 0}
end
local calls, fails = 0, 0
local window_ms = tonumber(ARGV[2])
if window_ms > 0 then calls, fails = window_totals(window_ms, false) end
local s = {get('epoch', ''), num('version', 0), get('state', 'closed'), remaining(),
           num('failures', 0)}
return with_extra(s, num('trips', 0), redis.call('ZCOUNT', P, NOW, '+inf'),
                  num('probe_ok', 0), num('open_ms', 0), calls, fails, num('changed_at', 0))
