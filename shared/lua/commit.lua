-- commit: apply one scheduler transition (decided purely in Rust) atomically, guarded by
-- an optimistic revision check so concurrent schedulers never apply two transitions to one
-- process from the same snapshot (no step is ever enqueued twice).
-- KEYS[1] the process meta hash (the guarded record); KEYS[2..] every other key the ops use
-- ARGV[1] mode: 'create' (the process must not exist) | 'update' (rev must equal ARGV[2])
-- ARGV[2] expected rev (update)
-- ARGV[3] KEYS index of the idempotency key (create), 0 for none
-- ARGV[4] KEYS index of the source stream to acknowledge whatever the outcome (except
--         'conflict'), 0 for none; ARGV[5] its group; ARGV[6] the entry id
-- ARGV[7] number of ops, then the ops:
--   hset k n f v ... | hdel k n f ... | xadd k n f v ... | zadd k score member
--   | zaddin k delay_ms member | zrem k member | expire k secs | persist k
--   | setex k secs value | del k
-- (k is a KEYS index). Every op is parsed before anything is written.
-- Returns {'ok', now} | {'conflict', rev} | {'gone'} | {'exists'} | {'duplicate', process_id}
local mode = ARGV[1]
local ops, i = {}, 8
local nops = tonumber(ARGV[7])
local function key(idx)
  local k = KEYS[tonumber(idx)]
  if not k then
    error('commit: bad key index ' .. tostring(idx))
  end
  return k
end
for _ = 1, nops do
  local op = ARGV[i]
  local k = key(ARGV[i + 1])
  if op == 'hset' or op == 'xadd' then
    local n = tonumber(ARGV[i + 2])
    local args = {}
    for j = 1, 2 * n do
      args[j] = ARGV[i + 2 + j]
    end
    ops[#ops + 1] = {op, k, args}
    i = i + 3 + 2 * n
  elseif op == 'hdel' then
    local n = tonumber(ARGV[i + 2])
    local args = {}
    for j = 1, n do
      args[j] = ARGV[i + 2 + j]
    end
    ops[#ops + 1] = {op, k, args}
    i = i + 3 + n
  elseif op == 'zadd' or op == 'zaddin' or op == 'setex' then
    ops[#ops + 1] = {op, k, {ARGV[i + 2], ARGV[i + 3]}}
    i = i + 4
  elseif op == 'zrem' or op == 'expire' then
    ops[#ops + 1] = {op, k, {ARGV[i + 2]}}
    i = i + 3
  elseif op == 'persist' or op == 'del' then
    ops[#ops + 1] = {op, k, {}}
    i = i + 2
  else
    error('commit: unknown op ' .. tostring(op))
  end
end

local function ack_source()
  local s = tonumber(ARGV[4])
  if s > 0 then
    ack_del(key(s), ARGV[5], ARGV[6])
  end
end

local meta = KEYS[1]
if mode == 'create' then
  local idem = tonumber(ARGV[3])
  if idem > 0 then
    local existing = redis.call('GET', key(idem))
    if existing then
      ack_source()
      return {'duplicate', existing}
    end
  end
  if redis.call('EXISTS', meta) == 1 then
    ack_source()
    return {'exists'}
  end
elseif mode == 'update' then
  local rev = redis.call('HGET', meta, F_REV)
  if not rev then
    ack_source()
    return {'gone'}
  end
  if rev ~= ARGV[2] then
    return {'conflict', rev}
  end
else
  error('commit: unknown mode ' .. tostring(mode))
end

local now = now_ms()
for _, o in ipairs(ops) do
  local op, k, a = o[1], o[2], o[3]
  if op == 'hset' then
    redis.call('HSET', k, unpack(a))
  elseif op == 'hdel' then
    redis.call('HDEL', k, unpack(a))
  elseif op == 'xadd' then
    redis.call('XADD', k, '*', unpack(a))
  elseif op == 'zadd' then
    redis.call('ZADD', k, a[1], a[2])
  elseif op == 'zaddin' then
    redis.call('ZADD', k, now + tonumber(a[1]), a[2])
  elseif op == 'zrem' then
    redis.call('ZREM', k, a[1])
  elseif op == 'expire' then
    redis.call('EXPIRE', k, a[1])
  elseif op == 'persist' then
    redis.call('PERSIST', k)
  elseif op == 'setex' then
    redis.call('SET', k, a[2], 'EX', a[1])
  elseif op == 'del' then
    redis.call('DEL', k)
  end
end
ack_source()
return {'ok', now}
