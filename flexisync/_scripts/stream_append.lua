-- stream_append: append one event to a Stream, trim it and refresh its expiry, atomically.
-- KEYS[1]  the stream key
-- ARGV[1]  MAXLEN for approximate trimming ("~"), or "0" for no trimming
-- ARGV[2]  expiry in milliseconds, set on every append, or "0" to leave the expiry alone
-- ARGV[3]  the stream's wake-up channel, or "" for none: after the append the new id is
--          PUBLISHed there, so each process's one reader of the stream fetches it (a
--          wake-up only: readers always read the entries from the stream itself)
-- ARGV[4..] field, value, field, value... of the entry
-- The entry gets one more field, "prev": the id of the entry that was newest before it
-- ("" for the first entry of the stream). Trimming removes whole nodes, so the oldest
-- retained entry's "prev" is exactly the last id that was trimmed away: a reader can
-- tell whether anything after its resume point was lost (see stream_read.lua).
-- Returns the new entry id ("<ms>-<seq>").
local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local prev = ''
if #newest > 0 then
  prev = newest[1][1]
end
local args = {'XADD', KEYS[1]}
if ARGV[1] ~= '0' then
  args[#args + 1] = 'MAXLEN'
  args[#args + 1] = '~'
  args[#args + 1] = ARGV[1]
end
args[#args + 1] = '*'
for i = 4, #ARGV do
  args[#args + 1] = ARGV[i]
end
args[#args + 1] = 'prev'
args[#args + 1] = prev
local id = redis.call(unpack(args))
if ARGV[2] ~= '0' then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
if ARGV[3] ~= '' then
  redis.call('PUBLISH', ARGV[3], id)
end
return id
