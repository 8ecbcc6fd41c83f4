-- purge: delete one finished process now (operator purge), only if it is still in the
-- expected finished status; a process that is running (or was retried) is never touched.
-- KEYS[1] process meta hash, KEYS[2] steps hash, KEYS[3] data hash,
-- KEYS[4] the status index, KEYS[5] the all-processes index
-- ARGV[1] expected status, ARGV[2] process id
-- Returns 1 when deleted, 0 when skipped
local st = redis.call('HGET', KEYS[1], F_STATUS)
if st ~= ARGV[1] or process_active(st) then
  if not st then
    redis.call('ZREM', KEYS[4], ARGV[2])
    redis.call('ZREM', KEYS[5], ARGV[2])
  end
  return 0
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('ZREM', KEYS[4], ARGV[2])
redis.call('ZREM', KEYS[5], ARGV[2])
return 1
