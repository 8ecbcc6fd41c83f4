-- release: hand a running step back at shutdown so another worker resumes it at once
-- (from its last checkpoint) instead of waiting for the lease to expire.
-- KEYS[1] job stream, KEYS[2] process meta, KEYS[3] steps hash
-- ARGV[1] group, ARGV[2] consumer, ARGV[3] entry id, ARGV[4] deliveries seen at claim,
-- ARGV[5] step, ARGV[6] token, ARGV[7..] fields of the job to re-enqueue (name, value pairs)
-- Returns 'ok' | 'stale' | 'finished'
local jobs, meta, steps = KEYS[1], KEYS[2], KEYS[3]
local group, consumer, id, dl, step, token = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local r, rec = fence(jobs, group, consumer, id, dl, meta, steps, step, token)
if r == 'finished' then
  ack(jobs, group, id)
end
if r ~= 'ok' then
  return r
end
ack(jobs, group, id)
local args = {jobs, '*'}
for i = 7, #ARGV do
  args[#args + 1] = ARGV[i]
end
redis.call('XADD', unpack(args))
rec.status = SS_QUEUED
rec.worker = nil
redis.call('HSET', steps, step, cjson.encode(rec))
return 'ok'
