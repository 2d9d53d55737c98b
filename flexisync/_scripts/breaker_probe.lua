-- include: breaker_lib
-- breaker_probe: ask to run a call. Moves open -> half_open once the open period is
-- over, and admits at most half_open_max_calls probes at once across every process,
-- each holding a lease that expires (a probe whose worker died frees its slot).
-- (KEYS and ARGV[1] as in breaker_lib.lua.)
-- ARGV[2]  probe token (unique per call)
-- ARGV[3]  lease in ms
-- ARGV[4]  half_open_max_calls
-- Returns snapshot followed by {verdict, retry_ms}: verdict 1 = admitted as a probe,
-- 2 = admitted as a plain call (closed or disabled), 0 = rejected; retry_ms is how long
-- until a probe may be admitted (-1 = forced open, no end; while half-open with every
-- slot taken, at most the current open period).
if ARGV[2] == '' or #ARGV[2] > 64 then reject('ARGV[2] must be a probe token') end
local lease = arg_int(3, 1, MAX_MS)
local slots = arg_int(4, 1, 1000000)
check_record(true)
local before = state_now()
local st = before
if st == 'open' then
  local open_until = num('open_until', 0)
  if NOW < open_until then return with_extra(snapshot(before), 0, open_until - NOW) end
  redis.call('HSET', H, 'state', 'half_open', 'probe_ok', 0)
  redis.call('DEL', P)
  publish(before)
  st = 'half_open'
end
if st == 'half_open' then
  redis.call('ZREMRANGEBYSCORE', P, '-inf', NOW)
  if redis.call('ZCARD', P) < slots then
    redis.call('ZADD', P, NOW + lease, ARGV[2])
    redis.call('PEXPIRE', P, lease * 2)
    return with_extra(snapshot(before), 1, 0)
  end
  -- Every slot is taken: a probe may be admitted when one settles (published) or when
  -- the earliest lease expires; the hint never exceeds the current open period.
  local first = redis.call('ZRANGE', P, 0, 0, 'WITHSCORES')
  local lease_left = math.max(1, tonumber(first[2]) - NOW)
  return with_extra(snapshot(before), 0, math.min(lease_left, num('open_ms', lease_left)))
end
if st == 'forced_open' then return with_extra(snapshot(before), 0, -1) end
return with_extra(snapshot(before), 2, 0)
