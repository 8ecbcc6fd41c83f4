-- complete: commit the results of a batch of steps, each exactly once: output write,
-- completion event and acknowledgement in one step, only by the current owner with the
-- current fence. Every job is checked and committed on its own; one call saves round trips.
-- KEYS[1] job stream, KEYS[2] results stream (the scheduler reads step results from it)
-- KEYS[3i..3i+2]  for job i: process meta hash, steps hash, data hash
-- ARGV[1] group, ARGV[2] consumer, then for each job: entry id, deliveries seen at claim,
-- step, token, output blob ('' for none), '1' when the step may have a checkpoint (its
-- begin saw one or it saved one: only then is the checkpoint field deleted) else '0', n,
-- then n event fields as name, value pairs (the
-- event's outcome must be among them), then the transition the worker decided from the
-- result: '0' (none) | '1', rev, steps rev (the revision it was decided on), s, s pairs of
-- step name and step record (JSON), j, then j jobs, each as f and f field name, value pairs
-- Returns one answer per job: 'ok' (committed; the event is the scheduler's to apply)
--   | 'fast' (committed with its transition: step records written, jobs enqueued, the
--     steps rev raised, no event) | 'stale' (nothing written)
--   | 'finished' (process over: acknowledged, discarded)
-- The transition applies only while the meta hash's rev and the steps hash's steps rev
-- are those it was decided on: every other commit to the process raises one of them, so
-- a transition decided on an older state falls back to the event, which the scheduler
-- decides again from what is current.
-- A retry of a commit that already landed (its reply was lost: a timeout, a pause) answers
-- 'ok' again and writes nothing: the entry is acknowledged and the step record still shows
-- this token's result, committed by this consumer under this delivery count.
local jobs, events, group, consumer = KEYS[1], KEYS[2], ARGV[1], ARGV[2]

-- Parse and validate every job before writing anything.
local todo, a = {}, 3
while a <= #ARGV do
  local n = tonumber(ARGV[a + 6])
  if not n or n < 1 then
    return redis.error_reply('complete: bad event field count')
  end
  local t = {id = ARGV[a], dl = ARGV[a + 1], step = ARGV[a + 2], token = ARGV[a + 3],
    output = ARGV[a + 4], ck = ARGV[a + 5] == '1', first = a + 7, last = a + 6 + 2 * n}
  if t.last > #ARGV then
    return redis.error_reply('complete: short arguments')
  end
  for i = t.first, t.last, 2 do
    local f = ARGV[i]
    if f == E_OUTCOME then t.outcome = ARGV[i + 1]
    elseif f == E_ERROR then t.error = ARGV[i + 1]
    elseif f == E_CODE then t.code = ARGV[i + 1]
    end
  end
  if not t.outcome or t.outcome == '' then
    return redis.error_reply('complete: event has no outcome')
  end
  a = t.last + 1
  local flag = ARGV[a]
  if flag == '1' then
    local ns = tonumber(ARGV[a + 3])
    if not ns then
      return redis.error_reply('complete: bad step record count')
    end
    t.rev, t.srev, t.sfirst, t.slast = ARGV[a + 1], ARGV[a + 2], a + 4, a + 3 + 2 * ns
    a = t.slast + 1
    t.jobs = {}
    if not tonumber(ARGV[a]) then
      return redis.error_reply('complete: bad job count')
    end
    for _ = 1, tonumber(ARGV[a]) do
      local nf = tonumber(ARGV[a + 1])
      if not nf or nf < 1 then
        return redis.error_reply('complete: bad job field count')
      end
      t.jobs[#t.jobs + 1] = {a + 2, a + 1 + 2 * nf}
      a = a + 1 + 2 * nf
    end
    a = a + 1
  elseif flag == '0' then
    a = a + 1
  else
    return redis.error_reply('complete: bad transition flag')
  end
  if a - 1 > #ARGV then
    return redis.error_reply('complete: short arguments')
  end
  todo[#todo + 1] = t
end
if #KEYS ~= 2 + 3 * #todo then
  return redis.error_reply('complete: ' .. #KEYS .. ' keys for ' .. #todo .. ' jobs')
end

-- The step record with this attempt's result. The common shape (the running record of this
-- token, no history and no result fields yet: a visit's first attempt) is edited as text
-- instead of decoded and re-encoded: a key matched with its quotes and colon cannot occur
-- inside a JSON string (its quotes are escaped), and with no history the record has no
-- nested object. Any other shape goes through cjson. Returns 'ok', json | 'stale'.
local function done_record(raw, t, now)
  local running = '"status":"' .. SS_RUNNING .. '"'
  local s, e = string.find(raw, running, 1, true)
  if s and string.sub(raw, -1) == '}'
      and string.find(raw, '"token":' .. cjson.encode(t.token), 1, true)
      and not string.find(raw, '"history":', 1, true)
      and not string.find(raw, '"outcome":', 1, true)
      and not string.find(raw, '"error":', 1, true)
      and not string.find(raw, '"code":', 1, true)
      and not string.find(raw, '"ended_ms":', 1, true) then
    local parts = {string.sub(raw, 1, s - 1), '"status":"', SS_DONE, '"', string.sub(raw, e + 1, -2),
      ',"outcome":', cjson.encode(t.outcome)}
    if t.error then
      parts[#parts + 1] = ',"error":' .. cjson.encode(t.error)
    end
    if t.code then
      parts[#parts + 1] = ',"code":' .. cjson.encode(t.code)
    end
    parts[#parts + 1] = ',"ended_ms":' .. now .. '}'
    return 'ok', table.concat(parts)
  end
  local rec = cjson.decode(raw)
  if rec.token ~= t.token or rec.status ~= SS_RUNNING then
    return 'stale'
  end
  rec.status = SS_DONE
  rec.outcome = t.outcome
  rec.error = t.error
  rec.code = t.code
  rec.ended_ms = now
  return 'ok', cjson.encode(rec)
end

-- True when this exact commit (token, consumer, delivery count) already landed.
local function landed(t, steps)
  local raw = redis.call('HGET', steps, t.step)
  if not raw then
    return false
  end
  local rec = cjson.decode(raw)
  -- Only complete.lua marks a record done; once routed, the outcome and code it wrote stay
  -- (a dead-letter of the same claim writes its own code, never a handler's).
  return rec.token == t.token and rec.worker == consumer
    and tonumber(rec.deliveries) == tonumber(t.dl)
    and (rec.status == SS_DONE or rec.status == SS_COMPLETED or rec.status == SS_FAILED)
    and rec.outcome == t.outcome and (rec.code ~= cjson.null and rec.code or nil) == t.code
end

-- The step's output, and its checkpoint gone once it succeeded.
local function write_result(t, data)
  if t.output ~= '' then
    redis.call('HSET', data, F_OUTPUT_PREFIX .. t.step, t.output)
  end
  if t.ck and t.outcome ~= OUTCOME_FAILED then
    redis.call('HDEL', data, F_CHECKPOINT_PREFIX .. t.step)
  end
end

-- This consumer's PEL entries of the batch's ids, read once before anything is written.
local ids = {}
for j, t in ipairs(todo) do
  ids[j] = t.id
end
local held = pending_entries(jobs, group, consumer, ids)

-- The entries this call acknowledges, acknowledged with one XACK at the end (the call is
-- atomic, so nothing can see them in between); an entry acknowledged earlier in this call
-- counts as acknowledged.
local acked, acked_ids = {}, {}
local function ack_later(id)
  if not acked[id] then
    acked[id] = true
    acked_ids[#acked_ids + 1] = id
  end
end

-- Owner- and fence-checked like `fence` in the prelude, then committed.
local now
local function complete_one(t, meta, steps, data)
  local p = not acked[t.id] and held[t.id]
  if not p and landed(t, steps) then
    return 'ok'
  end
  if not p or tonumber(p[4]) ~= tonumber(t.dl) then
    return 'stale'
  end
  local m = redis.call('HMGET', meta, F_STATUS, F_REV)
  if not m[1] or not process_active(m[1]) then
    ack_later(t.id)
    return 'finished'
  end
  -- The worker's transition was decided on the rev this claim's begin returned and the
  -- steps hash the worker read right after it (with its steps rev). While the process is
  -- still at both revisions the step records are still those (any other write to them
  -- fails the claim check above or raises rev or the steps rev), so they are not read
  -- again here.
  if t.rev and m[2] == t.rev then
    local srev = redis.call('HGET', steps, F_STEPS_REV) or '0'
    if srev == t.srev then
      write_result(t, data)
      redis.call('HSET', steps, F_STEPS_REV, tonumber(srev) + 1, unpack(ARGV, t.sfirst, t.slast))
      for _, j in ipairs(t.jobs) do
        redis.call('XADD', jobs, '*', unpack(ARGV, j[1], j[2]))
      end
      ack_later(t.id)
      return 'fast'
    end
  end
  local raw = redis.call('HGET', steps, t.step)
  if not raw then
    return 'stale'
  end
  now = now or now_ms()
  local r, rec = done_record(raw, t, now)
  if r ~= 'ok' then
    return r
  end
  write_result(t, data)
  redis.call('HSET', steps, t.step, rec)
  redis.call('XADD', events, '*', unpack(ARGV, t.first, t.last))
  ack_later(t.id)
  return 'ok'
end

local out = {}
for j, t in ipairs(todo) do
  out[j] = complete_one(t, KEYS[3 * j], KEYS[3 * j + 1], KEYS[3 * j + 2])
end
-- In chunks: `unpack` of a few thousand values fails.
for i = 1, #acked_ids, 500 do
  redis.call('XACK', jobs, group, unpack(acked_ids, i, math.min(i + 499, #acked_ids)))
end
return out
