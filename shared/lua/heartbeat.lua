-- heartbeat: extend the lease of every step a worker runs, owner- and fence-checked.
-- A stale worker can never steal a job back (a raw XCLAIM JUSTID would).
-- KEYS[1] job stream, KEYS[2] workers registry (sorted set)
-- KEYS[3i..3i+1] for job i: process meta hash, steps hash
-- ARGV[1] group, ARGV[2] consumer
-- ARGV[4i-1..4i+2] for job i: entry id, deliveries seen at claim, step, token
-- Returns per job: 'ok' | 'stale' (someone else owns it now: stop, never commit)
--                  | 'finished' (process over: acknowledged; stop)
local jobs, workers, group, consumer = KEYS[1], KEYS[2], ARGV[1], ARGV[2]
local now = now_ms()
redis.call('ZADD', workers, now, consumer)
local out = {}
local n = (#ARGV - 2) / 4
for i = 1, n do
  local meta, steps = KEYS[2 * i + 1], KEYS[2 * i + 2]
  local id, dl, step, token = ARGV[4 * i - 1], ARGV[4 * i], ARGV[4 * i + 1], ARGV[4 * i + 2]
  local r = fence(jobs, group, consumer, id, dl, meta, steps, step, token)
  if r == 'ok' then
    redis.call('XCLAIM', jobs, group, consumer, 0, id, 'JUSTID')
  elseif r == 'finished' then
    ack(jobs, group, id)
  end
  out[i] = r
end
return out
