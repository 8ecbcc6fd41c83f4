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

-- The PEL entries of a batch of ids that `consumer` holds: a table from id to
-- {id, consumer, idle_ms, deliveries}; an id it does not hold is absent. One XPENDING over
-- the batch's id range (filtered to the consumer, whose own PEL Redis walks) replaces one
-- call per id: a call from Lua costs several times the command itself. Ids the range reply
-- could not hold (the consumer holds more entries inside the range than it returned) are
-- looked up one by one.
local function stream_id(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function pending_entries(stream, group, consumer, ids)
  local found = {}
  local lo, hi, lo_ms, lo_seq, hi_ms, hi_seq
  for _, id in ipairs(ids) do
    local ms, seq = stream_id(id)
    if not ms or not seq then
      lo = nil
      break
    end
    if not lo or ms < lo_ms or (ms == lo_ms and seq < lo_seq) then
      lo, lo_ms, lo_seq = id, ms, seq
    end
    if not hi or ms > hi_ms or (ms == hi_ms and seq > hi_seq) then
      hi, hi_ms, hi_seq = id, ms, seq
    end
  end
  -- One id, or an id that is not an entry id (the per-id path reports it as Redis does):
  -- no range call.
  local complete = false
  if lo and #ids > 1 then
    local limit = #ids + 64
    local r = redis.call('XPENDING', stream, group, lo, hi, limit, consumer)
    for _, p in ipairs(r) do
      found[p[1]] = p
    end
    complete = #r < limit
  end
  if not complete then
    for _, id in ipairs(ids) do
      if not found[id] then
        local p = pending_entry(stream, group, id)
        if p and p[2] == consumer then
          found[id] = p
        end
      end
    end
  end
  return found
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
