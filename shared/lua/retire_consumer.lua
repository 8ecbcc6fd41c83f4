-- retire_consumer: delete a consumer only if it owns no pending entry (XGROUP DELCONSUMER
-- would silently drop them) and, with a minimum idle given, only if its worker has not
-- heartbeated for that long (a live worker is never retired); drop it from the workers
-- registry and what it registered at start too, so `XINFO CONSUMERS` and the workers list
-- show the live fleet.
-- KEYS[1] the stream, KEYS[2] workers registry (sorted set, score = last heartbeat ms),
-- KEYS[3] workers info (hash, field per worker)
-- ARGV[1] group, ARGV[2] consumer, ARGV[3] minimum ms since its last heartbeat (0: none)
-- Returns 1 when deleted, 0 when it still owns entries or heartbeated too recently
local r = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if #r > 0 then
  return 0
end
local min_idle = tonumber(ARGV[3]) or 0
if min_idle > 0 then
  local seen = redis.call('ZSCORE', KEYS[2], ARGV[2])
  if seen and now_ms() - tonumber(seen) < min_idle then
    return 0
  end
end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZREM', KEYS[2], ARGV[2])
redis.call('HDEL', KEYS[3], ARGV[2])
return 1
