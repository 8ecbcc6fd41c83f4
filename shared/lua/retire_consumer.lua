-- retire_consumer: delete a consumer only if it owns no pending entry (XGROUP DELCONSUMER
-- would silently drop them).
-- KEYS[1] the stream
-- ARGV[1] group, ARGV[2] consumer
-- Returns 1 when deleted, 0 when it still owns entries
local r = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if #r > 0 then
  return 0
end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1
