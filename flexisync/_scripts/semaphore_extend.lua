-- semaphore_extend: reset a held slot's lease to ARGV[2] ms from now (server clock).
-- KEYS[1]  the holders (ZSET token -> lease expiry, server milliseconds)
-- KEYS[2]  this token's marker (string, read only)
-- ARGV[1]  the owner token
-- ARGV[2]  the new lease in milliseconds
-- Returns "extended", "released" (this token's slot was given back) or "expired" (its
-- lease had run out, or the slot was removed).
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expiry = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not expiry or tonumber(expiry) <= now_ms then
  if redis.call('GET', KEYS[2]) == 'released' then return 'released' end
  return 'expired'
end
local lease = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], 'XX', now_ms + lease, ARGV[1])
if redis.call('PTTL', KEYS[1]) < lease then
  redis.call('PEXPIRE', KEYS[1], lease)
end
return 'extended'
