-- include: ratelimit_lib
-- ratelimit_adjust: give capacity back to a rate limiter or charge more, O(1).
-- KEYS[1]  the TAT (string: server microseconds), as in ratelimit_acquire
-- KEYS[2]  cancel only: the reservation's marker (see ratelimit_acquire)
-- ARGV[1]  "cancel" or "settle"
-- ARGV[2]  emission interval: server microseconds one unit of cost takes to refill
-- ARGV[3]  cancel: how long the tombstone lives, milliseconds;
--          settle: the correction in units (> 0 charges an overrun, < 0 returns capacity)
-- cancel: gives the reservation's whole cost back when its marker says it was reserved
-- (then, as when it was not, leaves a tombstone so a ratelimit_acquire still in flight
-- reserves nothing and a repeated cancel gives nothing back twice). Returns the units
-- given back.
-- settle: moves the TAT by the correction. Capacity given back never lifts the limiter
-- above its burst (the TAT never goes below now); an overrun is charged in full, so
-- later callers wait it off. Returns the correction applied, in units.
local now = now_us()
local interval = tonumber(ARGV[2])
local delta
if ARGV[1] == 'cancel' then
  local mark = redis.call('GET', KEYS[2])
  redis.call('SET', KEYS[2], 'x', 'PX', ARGV[3])
  if not mark or mark == 'x' then
    return '0'
  end
  delta = -tonumber(string.match(mark, '^(%S+) '))
else
  delta = tonumber(ARGV[3])
end
local tat, err = read_tat(KEYS[1], now)
if not tat then
  return redis.error_reply(err)
end
local new_tat = tat + delta * interval
if new_tat < now then new_tat = now end
write_tat(KEYS[1], new_tat, now)
return string.format('%.17g', (new_tat - tat) / interval)
