-- semaphore_read: how many live holders and waiters a semaphore has (server clock).
-- KEYS[1]  the holders (ZSET token -> lease expiry, server milliseconds)
-- KEYS[2]  the waiter expiries (ZSET token -> expiry, server milliseconds)
-- Returns {holders, waiters}. Read only.
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return {redis.call('ZCOUNT', KEYS[1], '(' .. now_ms, '+inf'),
        redis.call('ZCOUNT', KEYS[2], '(' .. now_ms, '+inf')}
