-- delete: remove one process and every reference to it (operator `state delete`), as purge
-- does for finished ones, plus what a live process is referenced by: its queued, pending and
-- dead-lettered jobs, its events and step results not yet applied, its delayed jobs and
-- timers, its idempotency key and its LLM usage. Nothing of it is left for a later process
-- with the same id to pick up (step tokens restart at 1.1). The caller found the stream
-- entries and delayed members with short cursor-paged reads, up to the id it passes per
-- stream; entries added after that are checked here, at most ARGV[5] per stream. An
-- unfinished process is refused unless forced. Everything is validated before any write.
-- KEYS[1] process meta hash, KEYS[2] steps hash, KEYS[3] data hash, KEYS[4] LLM usage hash,
-- KEYS[5] delayed set, KEYS[6] job stream, KEYS[7] event stream, KEYS[8] results stream,
-- KEYS[9] dead-letter stream, KEYS[10 .. 9+n] the process indexes (n = ARGV[6]),
-- KEYS[10+n] the idempotency key when ARGV[3] is not ''
-- ARGV[1] process id, ARGV[2] the rev the caller read ('' when it found no record),
-- ARGV[3] the idempotency key the caller read ('' none), ARGV[4] '1' to delete an unfinished
-- process, ARGV[5] at most this many entries per stream past the scanned id,
-- ARGV[6] n (number of index keys), ARGV[7] the steps rev the caller read ('' none),
-- ARGV[8] m, then m delayed-set members,
-- then for each stream of KEYS[6..9]: its consumer group ('' none: not acknowledged), the
-- last entry id the caller scanned ('0-0' for an empty stream), k, then k entry ids
-- Returns {'deleted', status, jobs, events, results, dead_letters, delayed}
--   | {'missing', same counts} (no record: only stray references were removed)
--   | {'running', status} (unfinished and not forced: nothing changed)
--   | {'changed'} (the record changed since the caller read it, or too many new entries to
--   check here: read and scan again)
local meta, steps, data, usage, delayed = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local pid, rev, idem, force, tail_max = ARGV[1], ARGV[2], ARGV[3], ARGV[4] == '1', tonumber(ARGV[5])
local nidx = tonumber(ARGV[6])
local steps_rev = ARGV[7]

local m = redis.call('HMGET', meta, F_STATUS, F_REV, F_IDEM)
local status = m[1]
if (m[2] or '') ~= rev or (m[3] or '') ~= idem
    or (redis.call('HGET', steps, F_STEPS_REV) or '') ~= steps_rev then
  return {'changed'}
end
if status and process_active(status) and not force then
  return {'running', status}
end

-- The process id of a stream entry's flat field list (nil when it has none).
local function entry_pid(fields)
  for i = 1, math.min(#fields, 2 * MAX_ENTRY_FIELDS), 2 do
    if fields[i] == E_PROCESS_ID then
      return fields[i + 1]
    end
  end
  return nil
end

-- Validation pass: the listed references, and the entries added since the scan.
local at = 8
local members = {}
for i = 1, tonumber(ARGV[at]) do
  members[i] = ARGV[at + i]
  if not string.find(members[i], pid, 1, true) then
    error('delete: delayed member ' .. members[i] .. ' is not of process ' .. pid)
  end
end
at = at + #members + 1
local streams = {}
for s = 1, 4 do
  local stream = KEYS[5 + s]
  local group, scanned, k = ARGV[at], ARGV[at + 1], tonumber(ARGV[at + 2])
  local ids = {}
  for i = 1, k do
    local id = ARGV[at + 2 + i]
    local e = redis.call('XRANGE', stream, id, id)[1]
    -- Gone already (acknowledged and trimmed) is fine; another process's entry is a bug.
    if e then
      if entry_pid(e[2]) ~= pid then
        error('delete: entry ' .. id .. ' of ' .. stream .. ' is not of process ' .. pid)
      end
      ids[#ids + 1] = id
    end
  end
  local tail = redis.call('XRANGE', stream, '(' .. scanned, '+', 'COUNT', tail_max + 1)
  if #tail > tail_max then
    return {'changed'}
  end
  for _, e in ipairs(tail) do
    if entry_pid(e[2]) == pid then
      ids[#ids + 1] = e[1]
    end
  end
  streams[s] = {stream = stream, group = group, ids = ids}
  at = at + 3 + k
end

-- Writes.
redis.call('DEL', meta, steps, data, usage)
for i = 1, nidx do
  redis.call('ZREM', KEYS[9 + i], pid)
end
if idem ~= '' then
  local key = KEYS[10 + nidx]
  if redis.call('GET', key) == pid then
    redis.call('DEL', key)
  end
end
local removed_delayed = 0
for _, member in ipairs(members) do
  removed_delayed = removed_delayed + redis.call('ZREM', delayed, member)
end
local counts = {}
for s, st in ipairs(streams) do
  for _, id in ipairs(st.ids) do
    if st.group ~= '' then
      ack(st.stream, st.group, id)
    end
    redis.call('XDEL', st.stream, id)
  end
  counts[s] = #st.ids
end
return {status and 'deleted' or 'missing', status or '', counts[1], counts[2], counts[3], counts[4], removed_delayed}
