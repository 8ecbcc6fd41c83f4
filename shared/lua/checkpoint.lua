-- checkpoint: save a running step's intermediate state and extend its lease.
-- KEYS[1] job stream, KEYS[2] process meta, KEYS[3] steps hash, KEYS[4] data hash
-- ARGV[1] group, ARGV[2] consumer, ARGV[3] entry id, ARGV[4] deliveries seen at claim,
-- ARGV[5] step, ARGV[6] token, ARGV[7] checkpoint blob (MessagePack, size-checked by Rust)
-- Returns 'ok' | 'stale' | 'finished'
local jobs, meta, steps, data = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local group, consumer, id, dl, step, token = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local r = fence(jobs, group, consumer, id, dl, meta, steps, step, token)
if r ~= 'ok' then
  return r
end
redis.call('HSET', data, F_CHECKPOINT_PREFIX .. step, ARGV[7])
redis.call('XCLAIM', jobs, group, consumer, 0, id, 'JUSTID')
return 'ok'
