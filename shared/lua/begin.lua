-- begin: a worker starts the jobs it just read (XREADGROUP) or reclaimed (reclaim.lua).
-- KEYS[1]            job stream
-- KEYS[3i-1..3i+1]   for job i: process meta hash, steps hash, data hash
-- ARGV[1] group, ARGV[2] consumer
-- ARGV[4i-1..4i+2]   for job i: entry id, step name, token, the traceparent of this
--                    attempt's span ('' when the worker does not trace)
-- Returns one reply per job:
--   {'ok', deliveries, type, version, step_record_json, data_hash_flat}
--   {'lost'}              the entry is no longer ours (reclaimed meanwhile): skip it
--   {'obsolete', reason}  superseded or the process is over: acknowledged and dropped
local jobs, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local now = now_ms()
local out = {}
local n = (#ARGV - 2) / 4
for i = 1, n do
  local meta, steps, data = KEYS[3 * i - 1], KEYS[3 * i], KEYS[3 * i + 1]
  local id, step, token, trace = ARGV[4 * i - 1], ARGV[4 * i], ARGV[4 * i + 1], ARGV[4 * i + 2]
  local p = pending_entry(jobs, group, id)
  if not p or p[2] ~= consumer then
    out[i] = {'lost'}
  else
    local m = redis.call('HMGET', meta, F_STATUS, F_TYPE, F_VERSION)
    local raw = redis.call('HGET', steps, step)
    local rec = raw and cjson.decode(raw)
    if not m[1] or not process_active(m[1]) then
      ack_del(jobs, group, id)
      out[i] = {'obsolete', 'process is ' .. tostring(m[1] or 'gone')}
    elseif not rec or rec.token ~= token or (rec.status ~= SS_QUEUED and rec.status ~= SS_DELAYED and rec.status ~= SS_RUNNING) then
      ack_del(jobs, group, id)
      out[i] = {'obsolete', 'job superseded'}
    else
      rec.status = SS_RUNNING
      rec.worker = consumer
      rec.deliveries = tonumber(p[4])
      if not rec.started_ms then
        rec.started_ms = now
      end
      rec.claimed_ms = now
      if trace ~= '' and rec.attempt_trace ~= trace then
        rec.previous_attempt_trace = rec.attempt_trace
        rec.attempt_trace = trace
      end
      local enc = cjson.encode(rec)
      redis.call('HSET', steps, step, enc)
      out[i] = {'ok', tonumber(p[4]), m[2], m[3], enc, redis.call('HGETALL', data)}
    end
  end
end
return out
