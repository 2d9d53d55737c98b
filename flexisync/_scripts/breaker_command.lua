-- include: breaker_lib
-- breaker_command: a manual transition.
-- (KEYS and ARGV[1] as in breaker_lib.lua.)
-- ARGV[2]  "trip" | "force_open" | "disable" | "reset"
-- ARGV[3]  trip: open period in ms ("" = the current open period, else ARGV[4])
-- ARGV[4]  recovery_timeout in ms
-- Returns snapshot. trip never shortens an open period and leaves forced_open and
-- disabled alone; reset always publishes, so every mirror re-syncs. forced_open and
-- disabled are manual states: the record then has no expiry until reset.
local op = arg_word(2, {trip = true, force_open = true, disable = true, reset = true})
local period = arg_ms_or_nil(3)
local recovery = arg_int(4, 1, MAX_MS)
check_record(false)
local st = state_now()
if op == 'trip' then
  local ms = period or num('open_ms', recovery)
  redis.call('HSETNX', H, 'open_ms', recovery)
  if open_for(ms) then return publish(st) end
  return snapshot(st)
elseif op == 'force_open' or op == 'disable' then
  local target = 'forced_open'
  if op == 'disable' then target = 'disabled' end
  if st == target then return snapshot(st) end
  redis.call('HSET', H, 'state', target, 'probe_ok', 0)
  redis.call('DEL', P)
  return publish(st)
end
close()
return publish(st)
