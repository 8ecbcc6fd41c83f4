-- llm_budget: check or charge the LLM token budgets of one process and its process type.
-- The process's usage lives in its partition and the type's daily counters in partition 0
-- (one count per type and day for the whole deployment), so with several partitions the
-- two are separate calls (modes 'process' and 'type'); in partition 0 one call does both.
-- ARGV[7] mode: 'all' | 'process' | 'type'; KEYS by mode:
--   all:     KEYS[1] process usage hash (fields tokens, cost_micro_usd), KEYS[2] the
--            process type's token counter of the current UTC day, KEYS[3] its cost
--            counter of the same day (micro-USD; the same TTL)
--   process: KEYS[1] process usage hash
--   type:    KEYS[1] day token counter, KEYS[2] day cost counter
-- ARGV[1] tokens to add (0 = check only), ARGV[2] cost to add (micro-USD),
-- ARGV[3] per-process token cap (0 = none), ARGV[4] per-type daily token cap (0 = none),
-- ARGV[5] TTL of the process usage (s), ARGV[6] TTL of the daily counters (s)
-- Returns {process tokens, type tokens today, over} after adding (0 for a part the mode
-- leaves out), where over is 0 (within budget), 1 (the process budget is spent) or 2 (the
-- type's daily budget is spent)
local add, cost = tonumber(ARGV[1]), tonumber(ARGV[2])
local pcap, tcap = tonumber(ARGV[3]), tonumber(ARGV[4])
local pttl, tttl = tonumber(ARGV[5]), tonumber(ARGV[6])
local mode = ARGV[7]
if not (add and cost and pcap and tcap and pttl and tttl) or add < 0 or cost < 0 then
  return redis.error_reply('llm_budget: bad arguments')
end
local usage, daily, daily_cost
if mode == 'all' and #KEYS == 3 then
  usage, daily, daily_cost = KEYS[1], KEYS[2], KEYS[3]
elseif mode == 'process' and #KEYS == 1 then
  usage = KEYS[1]
elseif mode == 'type' and #KEYS == 2 then
  daily, daily_cost = KEYS[1], KEYS[2]
else
  return redis.error_reply('llm_budget: bad mode or key count')
end
local p, t = 0, 0
if usage then
  p = tonumber(redis.call('HGET', usage, 'tokens') or '0')
  if add > 0 then
    p = redis.call('HINCRBY', usage, 'tokens', add)
    redis.call('HINCRBY', usage, 'cost_micro_usd', cost)
    redis.call('EXPIRE', usage, pttl)
  end
end
if daily then
  t = tonumber(redis.call('GET', daily) or '0')
  if add > 0 then
    t = redis.call('INCRBY', daily, add)
    redis.call('EXPIRE', daily, tttl)
    if cost > 0 then
      redis.call('INCRBY', daily_cost, cost)
      redis.call('EXPIRE', daily_cost, tttl)
    end
  end
end
local over = 0
if pcap > 0 and p >= pcap then
  over = 1
elseif tcap > 0 and t >= tcap then
  over = 2
end
return {p, t, over}
