-- stream_read: entries strictly after an id, and whether older ones were trimmed away.
-- KEYS[1]  the stream key
-- ARGV[1]  the id to read after ("<ms>-<seq>", validated by the caller)
-- ARGV[2]  the most entries to return, or "0" for all
-- Returns {trimmed, oldest, entries}: trimmed is 1 when ARGV[1] is older than the oldest
-- retained entry and the stream has lost entries to trimming (so events right after
-- ARGV[1] may be gone), else 0; oldest is the oldest retained id (or false when empty);
-- entries is the XRANGE reply (empty when trimmed is 1).
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return ms, seq
end
local function less(a, b)  -- decimal strings without leading zeros, compared exactly
  if #a ~= #b then return #a < #b end
  return a < b
end
local function older(a, b)
  local am, as = parse(a)
  local bm, bs = parse(b)
  if am ~= bm then return less(am, bm) end
  return less(as, bs)
end
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
if #first == 0 then
  return {0, false, {}}
end
local oldest = first[1][1]
if older(ARGV[1], oldest) then
  local info = redis.call('XINFO', 'STREAM', KEYS[1])
  local length, added = nil, nil
  for i = 1, #info, 2 do
    if info[i] == 'length' then length = info[i + 1] end
    if info[i] == 'entries-added' then added = info[i + 1] end
  end
  -- entries-added exists from Redis 7.0; before that, assume something was trimmed.
  if added == nil or added > length then
    return {1, oldest, {}}
  end
end
local entries
if ARGV[2] == '0' then
  entries = redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+')
else
  entries = redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', ARGV[2])
end
return {0, oldest, entries}
