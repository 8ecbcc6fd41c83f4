-- Shared prelude, prepended to every script by shared/src/scripts.rs. The constants
-- above this line are generated from the Rust definitions (status.rs, keys.rs, envelope.rs,
-- engine.rs), so status, field and event type names have one source.

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The PEL entry of one id: {id, consumer, idle_ms, deliveries}, or nil.
local function pending_entry(stream, group, id)
  local r = redis.call('XPENDING', stream, group, id, id, 1)
  return r[1]
end

-- Acknowledge one entry. Acknowledged entries are never needed again; they are not deleted
-- here (a per-entry XDEL cost more than the rest of the ack) but trimmed in bulk by
-- trim.lua, which removes only entries below every group's oldest pending and
-- last-delivered id, so pending and undelivered work is never touched.
local function ack(stream, group, id)
  redis.call('XACK', stream, group, id)
end

-- Appends a stream entry's fields (the flat list XRANGE/XAUTOCLAIM return) to `args`:
-- at most MAX_COPIED_FIELDS of them, then `fields_total` and the entry's field count when
-- some were left out, so the copy with its own fields stays under MAX_ENTRY_FIELDS.
-- Never copy or `unpack` a whole entry: any client may write the submission stream, and
-- `unpack` fails at a few thousand values.
local function append_fields(args, fields)
  local n = math.floor(#fields / 2)
  local keep = math.min(n, MAX_COPIED_FIELDS)
  for i = 1, keep * 2 do
    args[#args + 1] = fields[i]
  end
  if n > keep then
    args[#args + 1] = E_FIELDS_TOTAL
    args[#args + 1] = n
  end
end

-- Unfinished: its running steps may heartbeat and commit (a Paused process's too: pausing
-- lets them finish unless they were handed back, which changes their token).
local function process_active(status)
  return status == PS_PENDING or status == PS_RUNNING or status == PS_WAITING
    or status == PS_PAUSED
end

-- Owner- and fence-checked access to a running step.
-- Returns 'ok', record | 'stale' | 'finished' (process over or deleted: stop the step).
local function fence(jobs, group, consumer, id, deliveries, meta, steps, step, token)
  local p = pending_entry(jobs, group, id)
  if not p or p[2] ~= consumer or tonumber(p[4]) ~= tonumber(deliveries) then
    return 'stale'
  end
  local st = redis.call('HGET', meta, F_STATUS)
  if not st or not process_active(st) then
    return 'finished'
  end
  local raw = redis.call('HGET', steps, step)
  if not raw then
    return 'stale'
  end
  local rec = cjson.decode(raw)
  if rec.token ~= token or rec.status ~= SS_RUNNING then
    return 'stale'
  end
  return 'ok', rec
end
