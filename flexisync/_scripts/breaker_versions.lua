-- include: breaker_lib
-- breaker_versions: where many breakers' records stand, in one call, without changing
-- anything: the periodic refresh of every mirror of one process (the hub thread), which
-- then reads in full (breaker_read) only the records whose (epoch, version) moved.
-- KEYS[1..n]  the state HASH (KEYS[1] of the other breaker scripts) of n breakers; on a
--             cluster all n in one hash slot. The callers send at most 500 at a time.
-- ARGV: none
-- Returns 2n items, KEYS[i] at 2i-1 and 2i:
--   epoch, version   as breaker_read reports them ('', 0: no record);
--   '', -1           the key holds something flexisync did not write (another type, or
--                    a field flexisync owns with foreign data, as defects() in
--                    breaker_lib.lua sees it): the caller reads the record with
--                    breaker_read, which repairs or reports it.
-- (failures is not returned: whether it is 0 only changes with a published version, and
-- a mirror takes a record's values only with a new version.)
-- One HMGET per key: the fields defects() checks (the window and probes keys are checked
-- by the scripts that read them, before they use them).
local FIELDS = {'epoch', 'version', 'state'}
for f, _ in pairs(INTEGER_FIELDS) do
  if f ~= 'version' then FIELDS[#FIELDS + 1] = f end
end

-- Whether field FIELDS[i] holding v (false: absent) is one flexisync could have written.
local function sound(i, v)
  if not v then return true end
  local f = FIELDS[i]
  if f == 'state' then return STATES[v] == true end
  if f == 'epoch' then return #v <= 64 and string.match(v, '^[%w%.%-_]+$') ~= nil end
  return is_int(v, -LIMIT, LIMIT)
end

local out = {}
for k = 1, #KEYS do
  local values = redis.pcall('HMGET', KEYS[k], unpack(FIELDS))
  local ok = type(values) == 'table' and not values.err
  if ok then
    for i = 1, #FIELDS do
      if not sound(i, values[i]) then ok = false break end
    end
  end
  if ok then
    out[#out + 1] = values[1] or ''
    out[#out + 1] = tonumber(values[2] or 0)
  else
    out[#out + 1] = ''
    out[#out + 1] = -1
  end
end
return out
