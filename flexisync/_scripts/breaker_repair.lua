-- include: breaker_lib
-- breaker_repair: put right a record another program damaged (see defects() in
-- breaker_lib.lua). Fields flexisync owns that hold garbage are removed (their
-- defaults apply: a state that is not a state becomes closed), a window or probes key
-- of the wrong type or with garbage in it is deleted, and the record starts a new
-- epoch, published, so that every mirror re-reads it. A state key of another type is
-- replaced only with ARGV[2] = "force" (an explicit reset): it may be another
-- program's data.
-- (KEYS and ARGV[1] as in breaker_lib.lua.)
-- ARGV[2]  "force" or ""
-- Returns snapshot followed by the list of defects found (empty: nothing to repair).
-- Fails with "FLEXISYNC_MALFORMED ..." (and changes nothing) when the state key is of
-- another type and ARGV[2] is not "force".
local force = ARGV[2] == 'force'
local found = defects(true)
if #found == 0 then return with_extra(snapshot(state_now())) end
local t = redis.call('TYPE', H).ok
if t ~= 'hash' and t ~= 'none' then
  if not force then
    error('FLEXISYNC_MALFORMED ' .. table.concat(found, '; ') .. ' (reset() replaces it)')
  end
  redis.call('DEL', H)
end
t = redis.call('TYPE', W).ok
if t ~= 'none' then
  local bad = t ~= 'hash'
  if not bad then
    for _, v in ipairs(redis.call('HVALS', W)) do
      if not is_int(v, -LIMIT, LIMIT) then bad = true break end
    end
  end
  if bad then redis.call('DEL', W) end
end
t = redis.call('TYPE', P).ok
if t ~= 'none' and (t ~= 'zset' or
    redis.call('ZCOUNT', P, '(' .. (NOW + MAX_MS), '+inf') > 0) then
  redis.call('DEL', P)
end
if redis.call('TYPE', H).ok == 'hash' then
  for f, _ in pairs(INTEGER_FIELDS) do
    local v = redis.call('HGET', H, f)
    if v and not is_int(v, -LIMIT, LIMIT) then redis.call('HDEL', H, f) end
  end
  local st = redis.call('HGET', H, 'state')
  if st and not STATES[st] then redis.call('HDEL', H, 'state') end
end
local before = state_now()
redis.call('HSET', H, 'epoch', T[1] .. '.' .. T[2] .. '.r')
return with_extra(publish(before), unpack(found))
