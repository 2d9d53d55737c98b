-- semaphore_abandon: drop whatever an acquisition whose outcome is unknown (no reply in
-- time, a cancelled task) may hold: its slot and its queue entry; leave a marker so that
-- a command with this token still in flight takes nothing when it lands.
-- KEYS[1]  the holders (ZSET); KEYS[2] the waiter queue (ZSET); KEYS[3] its expiries
-- KEYS[4]  this token's marker (string; set here unless present, expires after ARGV[3] ms)
-- ARGV[1]  the owner token
-- ARGV[2]  the semaphore's wake-up channel (told when a slot or a place was freed)
-- ARGV[3]  milliseconds the marker lives (longer than the client retries)
-- Returns 1 when a slot was dropped, else 0.
local held = redis.call('ZREM', KEYS[1], ARGV[1])
local queued = redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('SET', KEYS[4], 'abandoned', 'NX', 'PX', ARGV[3])
if held + queued > 0 then
  redis.call('PUBLISH', ARGV[2], '')
end
return held
