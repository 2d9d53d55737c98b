-- include: breaker_lib
-- breaker_command: a manual transition.
-- (KEYS and ARGV[1] as in breaker_lib.lua.)
-- ARGV[2]  "trip" | "force_open" | "disable" | "reset"
-- ARGV[3]  trip: open period in ms ("" = the current open period, else ARGV[4])
-- ARGV[4]  recovery_timeout in ms
-- Returns snapshot. trip never shortens an open period and leaves forced_open and
-- disabled alone; reset always publishes, so every mirror re-syncs.
local op = ARGV[2]
local st = get('state', 'closed')
if op == 'trip' then
  local ms = tonumber(ARGV[3]) or num('open_ms', tonumber(ARGV[4]))
  redis.call('HSETNX', H, 'open_ms', ARGV[4])
  if open_for(ms) then return publish() end
  return snapshot()
elseif op == 'force_open' then
  if st == 'forced_open' then return snapshot() end
  redis.call('HSET', H, 'state', 'forced_open', 'probe_ok', 0)
  redis.call('DEL', P)
  return publish()
elseif op == 'disable' then
  if st == 'disabled' then return snapshot() end
  redis.call('HSET', H, 'state', 'disabled', 'probe_ok', 0)
  redis.call('DEL', P)
  return publish()
elseif op == 'reset' then
  close()
  return publish()
end
return redis.error_reply('unknown breaker command ' .. op)
