-- complete: commit a step's result exactly once: output write, completion event and
-- acknowledgement in one step, only by the current owner with the current fence.
-- KEYS[1] job stream, KEYS[2] process meta, KEYS[3] steps hash, KEYS[4] data hash,
-- KEYS[5] event stream
-- ARGV[1] group, ARGV[2] consumer, ARGV[3] entry id, ARGV[4] deliveries seen at claim,
-- ARGV[5] step, ARGV[6] token, ARGV[7] process id, ARGV[8] output blob ('' for none),
-- ARGV[9..] event fields (name, value pairs; the event's outcome must be among them)
-- Returns 'ok' | 'stale' (nothing written) | 'finished' (process over: acknowledged, discarded)
local jobs, meta, steps, data, events = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local group, consumer, id, dl, step, token = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local r, rec = fence(jobs, group, consumer, id, dl, meta, steps, step, token)
if r == 'finished' then
  ack_del(jobs, group, id)
end
if r ~= 'ok' then
  return r
end
local ev = {}
for i = 9, #ARGV, 2 do
  ev[ARGV[i]] = ARGV[i + 1]
end
if not ev.outcome or ev.outcome == '' then
  return redis.error_reply('complete: event has no outcome')
end
if ARGV[8] ~= '' then
  redis.call('HSET', data, F_OUTPUT_PREFIX .. step, ARGV[8])
end
if ev.outcome ~= OUTCOME_FAILED then
  redis.call('HDEL', data, F_CHECKPOINT_PREFIX .. step)
end
rec.status = SS_DONE
rec.outcome = ev.outcome
rec.error = ev.error
rec.code = ev.code
rec.ended_ms = now_ms()
redis.call('HSET', steps, step, cjson.encode(rec))
local args = {events, '*'}
for i = 9, #ARGV do
  args[#args + 1] = ARGV[i]
end
redis.call('XADD', unpack(args))
ack_del(jobs, group, id)
return 'ok'
