-- begin: a worker starts the jobs it just read (XREADGROUP) or reclaimed (reclaim.lua).
-- KEYS[1]            job stream
-- KEYS[3i-1..3i+1]   for job i: process meta hash, steps hash, data hash
-- ARGV[1] group, ARGV[2] consumer
-- ARGV[5i-2..5i+2]   for job i: entry id, step name, token, the traceparent of this
--                    attempt's span ('' when the worker does not trace), the delivery count
--                    the starter saw (1 for XREADGROUP, the XAUTOCLAIM count for a reclaim)
-- A claim is (entry id, delivery count): it begins only while the PEL still holds exactly
-- that claim for this consumer, so one claim starts at most one execution (a reader and a
-- sweeper of the same worker that both got the entry cannot both start it). Beginning
-- resets the entry's idle time, as a heartbeat does, when it has been idle for more than
-- a second (a read or reclaim just now reset it already: the common case costs no XCLAIM).
-- The process's data hash (and, for the worker's own transitions, its steps hash) are read
-- by the worker right after this call in the same pipeline, outside the function: values
-- that cross into Lua and back cost the server three times what a plain read does, and a
-- later state is as good as this one (a transition decided on it commits only while the
-- revisions it was decided on are current; see complete.lua).
-- Returns one reply per job:
--   {'ok', deliveries, type, version, step_record_json, tenant ('' none), status, rev,
--    trace ('' none)}
--   {'lost'}              the entry is no longer this claim (reclaimed meanwhile): skip it
--   {'obsolete', reason}  superseded or the process is over: acknowledged and dropped
local jobs, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local now = now_ms()

-- The step record marked running for this attempt, or nil when the job is superseded.
-- The common shape (a queued or delayed record of this token, no history and no attempt
-- fields yet: a visit's first attempt) is edited as text instead of decoded and re-encoded:
-- a key matched with its quotes and colon cannot occur inside a JSON string (its quotes are
-- escaped), and with no history the record has no nested object. Any other shape goes
-- through cjson.
local function running_record(raw, token, deliveries, trace)
  local s, e = string.find(raw, '"status":"' .. SS_QUEUED .. '"', 1, true)
  if not s then
    s, e = string.find(raw, '"status":"' .. SS_DELAYED .. '"', 1, true)
  end
  if s and string.sub(raw, -1) == '}'
      and string.find(raw, '"token":' .. cjson.encode(token), 1, true)
      and not string.find(raw, '"history":', 1, true)
      and not string.find(raw, '"worker":', 1, true)
      and not string.find(raw, '"deliveries":', 1, true)
      and not string.find(raw, '"started_ms":', 1, true)
      and not string.find(raw, '"claimed_ms":', 1, true)
      and not string.find(raw, '"attempt_trace":', 1, true)
      and not string.find(raw, '"previous_attempt_trace":', 1, true) then
    local parts = {string.sub(raw, 1, s - 1), '"status":"', SS_RUNNING, '"', string.sub(raw, e + 1, -2),
      ',"worker":', cjson.encode(consumer), ',"deliveries":', deliveries,
      ',"started_ms":', now, ',"claimed_ms":', now}
    if trace ~= '' then
      parts[#parts + 1] = ',"attempt_trace":' .. cjson.encode(trace)
    end
    parts[#parts + 1] = '}'
    return table.concat(parts)
  end
  local rec = cjson.decode(raw)
  if rec.token ~= token or (rec.status ~= SS_QUEUED and rec.status ~= SS_DELAYED and rec.status ~= SS_RUNNING) then
    return nil
  end
  rec.status = SS_RUNNING
  rec.worker = consumer
  rec.deliveries = deliveries
  if not rec.started_ms then
    rec.started_ms = now
  end
  rec.claimed_ms = now
  if trace ~= '' and rec.attempt_trace ~= trace then
    rec.previous_attempt_trace = rec.attempt_trace
    rec.attempt_trace = trace
  end
  return cjson.encode(rec)
end

local out = {}
local n = (#ARGV - 2) / 5
local ids = {}
for i = 1, n do
  ids[i] = ARGV[5 * i - 2]
end
local held = pending_entries(jobs, group, consumer, ids)
for i = 1, n do
  local meta, steps = KEYS[3 * i - 1], KEYS[3 * i]
  local a = 5 * i - 2
  local id, step, token, trace, seen = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  local p = held[id]
  if not p or tonumber(p[4]) ~= tonumber(seen) then
    out[i] = {'lost'}
  else
    local m = redis.call('HMGET', meta, F_STATUS, F_TYPE, F_VERSION, F_TENANT, F_REV, F_TRACE)
    if not m[1] or not process_active(m[1]) then
      ack(jobs, group, id)
      out[i] = {'obsolete', 'process is ' .. tostring(m[1] or 'gone')}
    else
      local raw = redis.call('HGET', steps, step)
      local enc = raw and running_record(raw, token, tonumber(p[4]), trace)
      if not enc then
        ack(jobs, group, id)
        out[i] = {'obsolete', 'job superseded'}
      else
        redis.call('HSET', steps, step, enc)
        if tonumber(p[3]) > 1000 then
          redis.call('XCLAIM', jobs, group, consumer, 0, id, 'JUSTID')
        end
        out[i] = {'ok', tonumber(p[4]), m[2], m[3], enc, m[4] or '', m[1], m[5] or '0', m[6] or ''}
      end
    end
  end
end
return out
