-- stream_read: entries strictly after a resume point, and whether that point is sound.
-- KEYS[1]  the stream key
-- ARGV[1]  the id to read after ("<ms>-<seq>", validated and normalized by the caller)
-- ARGV[2]  the most entries to return, or "0" for all
-- Returns {status, oldest, entries, newest}:
--   status  0: entries are every retained entry after ARGV[1] (up to ARGV[2]), and no
--              entry after ARGV[1] was ever removed before the first of them;
--           1: trimmed: an entry with an id after ARGV[1] existed and was removed
--              (trimmed or deleted), so reading on would skip it;
--           2: unknown: ARGV[1] lies beyond every id the stream has issued (beyond
--              the server's clock when the stream does not exist): it is not a point
--              of this stream, and new entries could get ids below it;
--   oldest  the oldest retained id when status is 1 (false when empty or otherwise);
--   entries the XRANGE reply (empty unless status is 0);
--   newest  the newest id the stream issued when status is 2 (false when none).
-- Soundness is exact for entries appended by stream_append.lua: the first entry after
-- ARGV[1] carries "prev", the id that was newest when it was appended, so something
-- between ARGV[1] and it was lost iff prev > ARGV[1]. For an entry without "prev"
-- (written by another program) it falls back to the stream's counters.
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
local function field(entry, name)
  local fields = entry[2]
  for i = 1, #fields, 2 do
    if fields[i] == name then return fields[i + 1] end
  end
  return nil
end
local function info()
  local reply = redis.call('XINFO', 'STREAM', KEYS[1])
  local found = {}
  for i = 1, #reply, 2 do
    found[reply[i]] = reply[i + 1]
  end
  return found
end
local function oldest_id()
  local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
  if #first == 0 then return false end
  return first[1][1]
end

local after = ARGV[1]
local entries
if after == '18446744073709551615-18446744073709551615' then
  entries = {}  -- the greatest id: nothing can follow it (and "(" would be refused)
elseif ARGV[2] == '0' then
  entries = redis.call('XRANGE', KEYS[1], '(' .. after, '+')
else
  entries = redis.call('XRANGE', KEYS[1], '(' .. after, '+', 'COUNT', ARGV[2])
end

if #entries > 0 then
  local prev = field(entries[1], 'prev')
  if prev ~= nil then
    if prev ~= '' and parse(prev) and older(after, prev) then
      return {1, oldest_id(), {}, false}
    end
    return {0, false, entries, false}
  end
  -- Not appended by flexisync: only the counters can tell (Redis >= 7.0), and only
  -- when the resume point is older than everything retained.
  if entries[1][1] == oldest_id() then
    local stats = info()
    local added, length = stats['entries-added'], stats['length']
    if added == nil or added > length then
      return {1, entries[1][1], {}, false}
    end
  end
  return {0, false, entries, false}
end

if redis.call('EXISTS', KEYS[1]) == 0 then
  local now = redis.call('TIME')
  local ms = parse(after)
  local now_ms = tostring(math.floor(tonumber(now[1]) * 1000 + tonumber(now[2]) / 1000))
  if less(now_ms, ms) then
    return {2, false, {}, false}
  end
  return {0, false, {}, false}
end
local stats = info()
local newest = stats['last-generated-id']
if newest == nil then
  local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
  newest = (#last > 0) and last[1][1] or '0-0'
end
if older(newest, after) then
  return {2, false, {}, newest}
end
if stats['length'] == 0 and older(after, newest) then
  return {1, false, {}, false}  -- every entry is gone, the newest one after ARGV[1] too
end
return {0, false, {}, false}
