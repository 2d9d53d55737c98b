-- ratelimit_lib: helpers shared by the rate limiter's scripts (included, not run alone).

-- The server's time in microseconds.
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- The limiter's theoretical arrival time stored in `key`, never earlier than `now`
-- (a missing or lapsed TAT means a full limiter); nil and an error text when the key
-- holds foreign data.
local function read_tat(key, now)
  local raw = redis.call('GET', key)
  if not raw then
    return now
  end
  local tat = tonumber(raw)
  if not tat then
    return nil, 'rate limiter state is not a number: foreign data in ' .. key
  end
  if tat < now then
    return now
  end
  return tat
end

-- Store `tat` in `key`, expiring when the limiter is full again (at `tat`).
local function write_tat(key, tat, now)
  if tat > now then
    redis.call('SET', key, string.format('%.3f', tat), 'PX', math.floor((tat - now) / 1000) + 1)
  else
    redis.call('DEL', key)
  end
end
