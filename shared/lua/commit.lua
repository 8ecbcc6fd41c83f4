-- commit: apply one scheduler transition (decided purely in Rust) atomically, guarded by
-- an optimistic revision check so concurrent schedulers never apply two transitions to one
-- process from the same snapshot (no step is ever enqueued twice).
-- KEYS[1] the process meta hash (the guarded record); KEYS[2..] every other key the ops use
-- ARGV[1] mode: 'create' (the process must not exist) | 'update' (the meta hash's rev must
--         equal ARGV[2] and the steps hash's steps rev ARGV[7]: the revision the transition
--         was decided on; KEYS[2] is the steps hash)
-- ARGV[2] expected rev (update)
-- ARGV[3] KEYS index of the idempotency key (create), 0 for none
-- ARGV[4] KEYS index of the source stream to acknowledge whatever the outcome (except
--         'conflict'), 0 for none; ARGV[5] its group; ARGV[6] the entry id
-- ARGV[7] expected steps rev (update; an absent field is 0)
-- ARGV[8] number of ops, then the ops:
--   hset k n f v ... | hdel k n f ... | xadd k n f v ... | zadd k score member
--   | zaddin k delay_ms member | zrem k member | hincrby k field n
--   | hincrbyttl k field n secs (HINCRBY, and EXPIRE when that made the field: a counter
--     hash gets its TTL from its first field, without an EXPIRE per increment)
--   | expire k secs | persist k
--   | setex k secs value | del k
--   | absent k   (a precondition, not a write: k must not exist, else the answer is
--                'closed' and nothing is written or acknowledged; a create that starts
--                steps carries the intake key, so no process starts once a drain is set)
-- (k is a KEYS index). Every op is parsed before anything is written.
-- Returns {'ok'} | {'conflict', rev} | {'gone'} | {'exists'} | {'duplicate', process_id}
--   | {'closed'}
local mode = ARGV[1]
local nops = tonumber(ARGV[8])
local function key(idx)
  local k = KEYS[tonumber(idx)]
  if not k then
    error('commit: bad key index ' .. tostring(idx))
  end
  return k
end
-- Validation pass: op names, key indexes and argument counts; nothing is copied (the
-- apply pass reads the arguments straight from ARGV).
local FIXED = {zadd = 2, zaddin = 2, setex = 2, hincrby = 2, hincrbyttl = 3, zrem = 1, expire = 1, persist = 0,
  del = 0, absent = 0}
local ops, absent, i = {}, {}, 9
for _ = 1, nops do
  local op = ARGV[i]
  key(ARGV[i + 1])
  local last
  if op == 'hset' or op == 'xadd' then
    last = i + 2 + 2 * tonumber(ARGV[i + 2])
  elseif op == 'hdel' then
    last = i + 2 + tonumber(ARGV[i + 2])
  elseif FIXED[op] then
    last = i + 1 + FIXED[op]
  else
    error('commit: unknown op ' .. tostring(op))
  end
  if last > #ARGV then
    error('commit: short arguments for ' .. op)
  end
  if op == 'absent' then
    absent[#absent + 1] = key(ARGV[i + 1])
  else
    ops[#ops + 1] = i
  end
  i = last + 1
end

local function ack_source()
  local s = tonumber(ARGV[4])
  if s > 0 then
    ack(key(s), ARGV[5], ARGV[6])
    -- A submission (the source of a create) is also deleted at once: one without an id
    -- would start a second process if it were ever read again (a group recreated from
    -- 0), where a replayed event changes nothing. Events are left to trim.lua.
    if mode == 'create' then
      redis.call('XDEL', key(s), ARGV[6])
    end
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
  if rev ~= ARGV[2] or (redis.call('HGET', KEYS[2], F_STEPS_REV) or '0') ~= ARGV[7] then
    return {'conflict', rev}
  end
else
  error('commit: unknown mode ' .. tostring(mode))
end
for _, k in ipairs(absent) do
  if redis.call('EXISTS', k) == 1 then
    return {'closed'}
  end
end

-- The server's clock only for a relative timer (one TIME call fewer per commit otherwise).
local now
for _, at in ipairs(ops) do
  local op, k = ARGV[at], key(ARGV[at + 1])
  if op == 'hset' then
    redis.call('HSET', k, unpack(ARGV, at + 3, at + 2 + 2 * tonumber(ARGV[at + 2])))
  elseif op == 'hdel' then
    redis.call('HDEL', k, unpack(ARGV, at + 3, at + 2 + tonumber(ARGV[at + 2])))
  elseif op == 'xadd' then
    redis.call('XADD', k, '*', unpack(ARGV, at + 3, at + 2 + 2 * tonumber(ARGV[at + 2])))
  elseif op == 'zadd' then
    redis.call('ZADD', k, ARGV[at + 2], ARGV[at + 3])
  elseif op == 'zaddin' then
    now = now or now_ms()
    redis.call('ZADD', k, now + tonumber(ARGV[at + 2]), ARGV[at + 3])
  elseif op == 'zrem' then
    redis.call('ZREM', k, ARGV[at + 2])
  elseif op == 'hincrby' then
    redis.call('HINCRBY', k, ARGV[at + 2], ARGV[at + 3])
  elseif op == 'hincrbyttl' then
    if redis.call('HINCRBY', k, ARGV[at + 2], ARGV[at + 3]) == tonumber(ARGV[at + 3]) then
      redis.call('EXPIRE', k, ARGV[at + 4])
    end
  elseif op == 'expire' then
    redis.call('EXPIRE', k, ARGV[at + 2])
  elseif op == 'persist' then
    redis.call('PERSIST', k)
  elseif op == 'setex' then
    redis.call('SET', k, ARGV[at + 3], 'EX', ARGV[at + 2])
  elseif op == 'del' then
    redis.call('DEL', k)
  end
end
ack_source()
return {'ok'}
