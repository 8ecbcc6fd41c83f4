-- promote: move due entries of the delayed set (retry backoffs, durable timers, process
-- deadlines) onto their stream. ZREM decides the winner, so concurrent schedulers never
-- promote one entry twice.
-- KEYS[1] delayed sorted set, KEYS[2] job stream, KEYS[3] event stream
-- ARGV[1] max entries to move in this call
-- Member format (JSON): {"k": "job"|"event", "f": [name, value, ...]}
-- Returns {moved, next_due_ms or false, now_ms}
local delayed, jobs, events = KEYS[1], KEYS[2], KEYS[3]
local now = now_ms()
local due = redis.call('ZRANGEBYSCORE', delayed, '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local moved = 0
for _, m in ipairs(due) do
  if redis.call('ZREM', delayed, m) == 1 then
    local ok, d = pcall(cjson.decode, m)
    if ok and type(d) == 'table' and type(d.f) == 'table' and #d.f >= 2 then
      local args = {(d.k == 'job') and jobs or events, '*'}
      for _, v in ipairs(d.f) do
        args[#args + 1] = tostring(v)
      end
      redis.call('XADD', unpack(args))
      moved = moved + 1
    end
  end
end
local nxt = redis.call('ZRANGE', delayed, 0, 0, 'WITHSCORES')
return {moved, nxt[2] or false, now}
