-- reclaim: take over jobs whose owner stopped heartbeating (idle > lease), or dead-letter
-- them once Redis's own delivery counter passes max_deliveries.
-- KEYS[1] job stream, KEYS[2] dead-letter stream, KEYS[3] results stream (dead-letter notices for the scheduler)
-- ARGV[1] group, ARGV[2] consumer, ARGV[3] min idle ms (the lease), ARGV[4] cursor,
-- ARGV[5] count, ARGV[6] max deliveries, ARGV[7] dead-letter stream approximate max length
-- Returns {next_cursor, {{id, deliveries, fields}...}, deleted_count, {dead_lettered_id...}}
-- XAUTOCLAIM scans at most COUNT*10 PEL entries per call, so this script is bounded;
-- the caller iterates the cursor.
local jobs, dlq, events = KEYS[1], KEYS[2], KEYS[3]
local group, consumer, min_idle, cursor = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local count, max_deliveries, dlq_max = ARGV[5], tonumber(ARGV[6]), ARGV[7]
local r = redis.call('XAUTOCLAIM', jobs, group, consumer, min_idle, cursor, 'COUNT', count)
local claimed, dead = {}, {}
for _, e in ipairs(r[2]) do
  local id, fields = e[1], e[2]
  local p = pending_entry(jobs, group, id)
  local n = tonumber(p[4])
  if n > max_deliveries then
    local f = {}
    for i = 1, math.min(#fields, 2 * MAX_ENTRY_FIELDS), 2 do
      f[fields[i]] = fields[i + 1]
    end
    local ran = n - 1
    local reason = 'delivered ' .. ran .. ' times without completing (max_deliveries ' .. max_deliveries .. ')'
    local args = {dlq, 'MAXLEN', '~', dlq_max, '*'}
    append_fields(args, fields)
    for _, v in ipairs({E_JOB_ID, id, E_DELIVERIES, ran, E_REASON, reason, E_DEAD_MS, now_ms()}) do
      args[#args + 1] = v
    end
    redis.call('XADD', unpack(args))
    redis.call('XADD', events, '*', E_VERSION, ENVELOPE_VERSION, E_TYPE, EV_DEAD_LETTER,
      E_PROCESS_ID, f[E_PROCESS_ID] or '', E_STEP, f[E_STEP] or '', E_TOKEN, f[E_TOKEN] or '',
      E_DELIVERIES, ran, E_REASON, reason)
    ack(jobs, group, id)
    dead[#dead + 1] = id
  else
    claimed[#claimed + 1] = {id, n, fields}
  end
end
return {r[1], claimed, #(r[3] or {}), dead}
