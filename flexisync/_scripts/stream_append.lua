-- stream_append: append one event to a Stream and refresh the stream's expiry, atomically.
-- KEYS[1]  the stream key
-- ARGV[1]  MAXLEN for approximate trimming ("~"), or "0" for no trimming
-- ARGV[2]  expiry in milliseconds, set on every append
-- ARGV[3..] field, value, field, value... of the entry
-- Returns the new entry id ("<ms>-<seq>").
local args = {'XADD', KEYS[1]}
if ARGV[1] ~= '0' then
  args[#args + 1] = 'MAXLEN'
  args[#args + 1] = '~'
  args[#args + 1] = ARGV[1]
end
args[#args + 1] = '*'
for i = 3, #ARGV do
  args[#args + 1] = ARGV[i]
end
local id = redis.call(unpack(args))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return id
