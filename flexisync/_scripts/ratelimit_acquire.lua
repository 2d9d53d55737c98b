-- include: ratelimit_lib
-- ratelimit_acquire: one admission decision of a fleet-wide rate limiter (GCRA), O(1)
-- whatever the cost. The limiter's whole state is one number, the theoretical arrival
-- time (TAT): the server time at which the limiter would be back to full burst.
-- KEYS[1]  the TAT (string: server microseconds; expires when the limiter is full again)
-- KEYS[2]  this reservation's marker (string "cost admit_at_us", or "x": a tombstone
--          written by ratelimit_adjust's cancel, so a reservation whose caller gave up
--          before this command arrived reserves nothing)
-- ARGV[1]  emission interval: server microseconds one unit of cost takes to refill
-- ARGV[2]  burst tolerance in microseconds (burst * interval)
-- ARGV[3]  the cost (units; > 0 and <= burst, checked by the client)
-- ARGV[4]  the longest wait the caller accepts, microseconds; -1: any wait
-- ARGV[5]  how long the marker outlives the reservation's admission time, milliseconds
-- Returns {1, wait_us, admit_at_us, remaining} when admitted (reserved: the caller may
-- proceed after wait_us microseconds, 0 = now), {0, wait_us, 0, remaining} when the
-- wait would exceed ARGV[4] (nothing reserved), {-1, 0, 0, 0} when the reservation was
-- cancelled before it arrived. A repeated call (same marker: a retry after a lost reply)
-- returns the first answer and reserves nothing more. Numbers are strings (Lua would
-- truncate floats); remaining = units that could be admitted right now after this call.
local now = now_us()
local interval = tonumber(ARGV[1])
local tau = tonumber(ARGV[2])
local mark = redis.call('GET', KEYS[2])
local tat, err = read_tat(KEYS[1], now)
if not tat then
  return redis.error_reply(err)
end
if mark then
  if mark == 'x' then
    return {-1, '0', '0', '0'}
  end
  local at = tonumber(string.match(mark, ' (%S+)$'))
  local wait = at - now
  if wait < 0 then wait = 0 end
  return {1, string.format('%.0f', wait), string.format('%.0f', at),
          string.format('%.17g', math.max(tau - (tat - now), 0) / interval)}
end
local cost = tonumber(ARGV[3])
local max_wait = tonumber(ARGV[4])
local new_tat = tat + cost * interval
local admit_at = new_tat - tau
local wait = admit_at - now
if wait <= 0 then
  wait = 0
  admit_at = now
end
if max_wait >= 0 and wait > max_wait then
  return {0, string.format('%.0f', math.ceil(wait)), '0',
          string.format('%.17g', math.max(tau - (tat - now), 0) / interval)}
end
write_tat(KEYS[1], new_tat, now)
redis.call('SET', KEYS[2], string.format('%.17g %.0f', cost, admit_at),
           'PX', math.floor(wait / 1000) + tonumber(ARGV[5]))
return {1, string.format('%.0f', math.ceil(wait)), string.format('%.0f', admit_at),
        string.format('%.17g', math.max(tau - (new_tat - now), 0) / interval)}
