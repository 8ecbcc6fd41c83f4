-- llm_budget: check or charge the LLM token budgets of one process and its process type.
-- KEYS[1] process usage hash (fields tokens, cost_micro_usd),
-- KEYS[2] process-type usage counter of the current UTC day (tokens),
-- KEYS[3] process-type cost counter of the same day (micro-USD; the same TTL)
-- ARGV[1] tokens to add (0 = check only), ARGV[2] cost to add (micro-USD),
-- ARGV[3] per-process token cap (0 = none), ARGV[4] per-type daily token cap (0 = none),
-- ARGV[5] TTL of the process usage (s), ARGV[6] TTL of the daily counter (s)
-- Returns {process tokens, type tokens today, over} after adding, where over is
-- 0 (within budget), 1 (the process budget is spent) or 2 (the type's daily budget is spent)
local usage, daily, daily_cost = KEYS[1], KEYS[2], KEYS[3]
local add, cost = tonumber(ARGV[1]), tonumber(ARGV[2])
local pcap, tcap = tonumber(ARGV[3]), tonumber(ARGV[4])
local pttl, tttl = tonumber(ARGV[5]), tonumber(ARGV[6])
if not (add and cost and pcap and tcap and pttl and tttl) or add < 0 or cost < 0 then
  return redis.error_reply('llm_budget: bad arguments')
end
local p = tonumber(redis.call('HGET', usage, 'tokens') or '0')
local t = tonumber(redis.call('GET', daily) or '0')
if add > 0 then
  p = redis.call('HINCRBY', usage, 'tokens', add)
  redis.call('HINCRBY', usage, 'cost_micro_usd', cost)
  redis.call('EXPIRE', usage, pttl)
  t = redis.call('INCRBY', daily, add)
  redis.call('EXPIRE', daily, tttl)
  if cost > 0 then
    redis.call('INCRBY', daily_cost, cost)
    redis.call('EXPIRE', daily_cost, tttl)
  end
end
local over = 0
if pcap > 0 and p >= pcap then
  over = 1
elseif tcap > 0 and t >= tcap then
  over = 2
end
return {p, t, over}
