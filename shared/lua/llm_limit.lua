-- llm_limit: fleet-wide GCRA limiter of one LLM bucket, requests and tokens at once.
--
-- Every decision uses the server's clock (TIME, in µs): worker clocks never meet.
-- A caller willing to wait books its slot: when the earliest admission lies within its
-- max wait, the cost is charged now as if it arrived then, and the caller sleeps the
-- returned wait before sending (one round trip per call, no re-check herd). Booking at
-- t + wait leaves the bucket exactly as an arrival at t + wait would.
-- A bucket of capacity C refilling at one unit per interval T is kept as its theoretical
-- arrival time `tat`: the bucket holds (tat - now) / T units while tat > now. A cost of n
-- units is admitted iff max(tat, now) + n*T - now <= C*T (the tolerance), and then tat
-- moves to max(tat, now) + n*T. Requests and tokens are checked together and charged only
-- when both admit (all or nothing), so no window ever sees more than C + rate * window.
--
-- Fair shares (optional): a bucket may split its capacity among shares (process types,
-- tenants: one "dimension" each). Within a dimension every share s that asked within the
-- last `window` is active and gets the rate r_s = clamp(lambda * weight_s, min_s, max_s),
-- lambda chosen so the active shares' rates add up to the bucket's request rate
-- (weighted max-min fairness with floors and caps: an idle share's capacity goes to the
-- busy ones). Its fraction phi_s = r_s / rate scales both of the bucket's limits into a
-- GCRA sub-bucket of its own (rate and burst times phi; the burst at least one request and
-- the call's reservation, so a small share is never refused for good). A call is booked at
-- the later of the bucket's next slot and its shares' next slots, but never past what the
-- bucket has booked already (tat): there it is charged as the bucket's next slot, so each
-- booking still lies within [tat - tolerance, tat] of its own charge and no window sees
-- more than burst + rate * window, and no slot is skipped (a booking beyond tat would leave
-- a hole no one else could use). Otherwise it is refused ('share') and asks again after
-- the hinted wait. The bucket stays the only clock of admissions, so a share can never push
-- it over its limit. When nothing is booked and the bucket is full (capacity is being
-- lost), a share without a maximum is admitted even past its fair rate; its sub-bucket's
-- debt is capped at one burst so it is not starved later.
--
-- KEYS[1] limit hash: `req_tat`, `tok_tat` (server µs, as exact decimal doubles); per
--         share `<dim>:<name>:rt|tt` (its sub-bucket's tats), `:ri|ti` (its intervals at
--         its last admission, for refunds), `:seen` (server µs it last asked or is booked)
-- KEYS[2] pause key: server µs until which the bucket is paused (provider 429)
-- KEYS[3] (acquire, optional; breaker: required) the fleet-wide circuit breaker hash:
--         `fails` (consecutive 5xx/timeouts), `open_until` (server µs; past it the breaker
--         is half-open), `probe_until` (server µs: the one half-open probe's lease)
-- ARGV[1] mode: 'acquire' | 'settle' | 'confirm' | 'pause' | 'breaker'
-- acquire: ARGV[2] request interval µs (0 = no request limit), ARGV[3] request tolerance µs,
--          ARGV[4] token interval µs per token (0 = no token limit), ARGV[5] token tolerance µs,
--          ARGV[6] tokens to reserve, ARGV[7] max wait µs the caller accepts (booking),
--          ARGV[8] (with KEYS[3]) probe lease µs (any number without),
--          ARGV[9] (shares, optional) window µs, ARGV[10] number of dimensions, then per
--          dimension: its prefix ('t' types, 'n' tenants), the caller's share name, the
--          count m of shares, and m times (name, weight, min rpm, max rpm; 0 = none); the
--          caller's share is one of the m
--   returns {1, wait_us, 'ok'} granted: send after wait_us (0 = now)
--         | {1, wait_us, 'failing'} granted; the breaker has counted failures (a success
--           must report, to reset the count)
--         | {1, wait_us, 'probe'} granted as the fleet's one half-open probe
--         | {0, wait_us, 'breaker_open'} the breaker is open (or another worker probes)
--         | {0, wait_us, 'paused' | 'rate'} not within the max wait; earliest in wait_us
--         | {0, wait_us, 'share'} a share of the caller is over its fair rate: ask again
--           after wait_us
--         | {0, 0, 'too_large'} the reservation exceeds the token capacity: never admissible
-- settle:  ARGV[2] request interval µs, ARGV[3] signed request difference (-1 gives a
--          booked, unused request back), ARGV[4] token interval µs per token, ARGV[5]
--          signed token difference (actual - reserved: negative refunds, positive charges),
--          ARGV[6..] the call's shares (`<dim>:<name>`), adjusted at their own intervals
--   returns {1, 0, 'ok'}
-- confirm: (after sleeping until a booked slot) ARGV[2] request interval µs, ARGV[3] token
--          interval µs, ARGV[4] tokens booked, ARGV[5..] the call's shares
--   returns {1, 0, 'ok'} send | {0, wait_us, 'paused'} the bucket was paused meanwhile:
--          the booked request and tokens were given back; the pause ends in wait_us
-- pause:   ARGV[2] pause length ms; the pause only ever grows (max with an existing one)
--   returns {1, remaining_us, 'paused'}
-- breaker: ARGV[2] 'success' | 'failure' | 'abandon' (a probe that was never sent),
--          ARGV[3] failures that open it, ARGV[4] open ms, ARGV[5] '1' when the call was
--          the probe
--   returns {1, open_us, 'opened' | 'open'} | {1, 0, 'counted' | 'closed' | 'ok'}

local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

local function num(s)
  local n = tonumber(s)
  if n == nil then
    return redis.error_reply('ERR llm_limit: not a number: ' .. tostring(s))
  end
  return n
end

-- %.17g round-trips a double exactly (tostring keeps only 14 digits).
local function fmt(x)
  return string.format('%.17g', x)
end

local mode = ARGV[1]
local now = now_us()

-- Moves one tat by `delta` units of interval `t` (a refund when negative). A refund below
-- `now` only means "full bucket" (acquire takes max(tat, now) anyway), so the field goes.
local function adjust(field, t, delta)
  if t <= 0 or delta == 0 then
    return
  end
  local tat = tonumber(redis.call('HGET', KEYS[1], field) or '0')
  local new_tat = math.max(tat, now) + delta * t
  if new_tat > now then
    redis.call('HSET', KEYS[1], field, fmt(new_tat))
    local ttl = redis.call('PTTL', KEYS[1])
    local need = math.ceil((new_tat - now) / 1000) + 1000
    if ttl < need then
      redis.call('PEXPIRE', KEYS[1], need)
    end
  else
    redis.call('HDEL', KEYS[1], field)
  end
end

-- Grows the hash's TTL to cover `until_us` (never shrinks it: other shares' state lives
-- in the same hash).
local function keep_until(until_us)
  local need = math.ceil((until_us - now) / 1000) + 1000
  if redis.call('PTTL', KEYS[1]) < need then
    redis.call('PEXPIRE', KEYS[1], need)
  end
end

-- The fraction of the bucket a share gets among the active ones: r = clamp(lambda * w,
-- lo, hi) (hi 0 = no cap) with lambda such that the rates add up to `limit` (rpm), by
-- bisection; by weight alone when the bucket has no request limit.
local function fair_fraction(act, own, w, lo, hi, limit)
  if limit <= 0 then
    local total = 0
    for _, j in ipairs(act) do total = total + w[j] end
    return w[own] / total
  end
  local function rate(j, lambda)
    local r = math.max(lambda * w[j], lo[j])
    if hi[j] > 0 then r = math.min(r, hi[j]) end
    return r
  end
  local function sum(lambda)
    local s = 0
    for _, j in ipairs(act) do s = s + rate(j, lambda) end
    return s
  end
  -- Weights are >= 1: at lambda = limit every uncapped share alone fills the bucket.
  local a, b = 0, limit
  if sum(b) > limit then
    for _ = 1, 60 do
      local mid = (a + b) / 2
      if sum(mid) < limit then a = mid else b = mid end
    end
  end
  return math.min(1, rate(own, b) / limit)
end

-- Share prefixes given after the fixed arguments of settle/confirm, from ARGV[first].
local function refund_shares(first, req_delta, tok_delta)
  for k = first, #ARGV do
    local p = ARGV[k]
    local f = redis.call('HMGET', KEYS[1], p .. ':ri', p .. ':ti')
    adjust(p .. ':rt', tonumber(f[1] or '0'), req_delta)
    adjust(p .. ':tt', tonumber(f[2] or '0'), tok_delta)
  end
end

if mode == 'acquire' then
  local req_t, req_tau = num(ARGV[2]), num(ARGV[3])
  local tok_t, tok_tau = num(ARGV[4]), num(ARGV[5])
  local tokens, max_wait = num(ARGV[6]), num(ARGV[7])
  for _, v in ipairs({req_t, req_tau, tok_t, tok_tau, tokens, max_wait}) do
    if type(v) == 'table' then return v end
    if v < 0 then return redis.error_reply('ERR llm_limit: negative argument') end
  end
  local brk, half, failing = KEYS[3], false, false
  if brk then
    local b = redis.call('HMGET', brk, 'open_until', 'probe_until', 'fails')
    local open_until = tonumber(b[1] or '0')
    if open_until > now then
      return {0, math.ceil(open_until - now), 'breaker_open'}
    elseif open_until > 0 then
      local probe_until = tonumber(b[2] or '0')
      if probe_until > now then
        return {0, math.ceil(probe_until - now), 'breaker_open'}
      end
      half = true
    elseif b[3] then
      failing = true
    end
  end
  local paused = tonumber(redis.call('GET', KEYS[2]) or '0')
  if paused > now then
    return {0, math.ceil(paused - now), 'paused'}
  end
  if tok_t > 0 and tokens * tok_t > tok_tau then
    return {0, 0, 'too_large'}
  end
  local state = redis.call('HMGET', KEYS[1], 'req_tat', 'tok_tat')
  local wait = 0
  local new_req, new_tok
  if req_t > 0 then
    new_req = math.max(tonumber(state[1] or '0'), now) + req_t
    wait = math.max(wait, new_req - now - req_tau)
  end
  if tok_t > 0 then
    new_tok = math.max(tonumber(state[2] or '0'), now) + tokens * tok_t
    wait = math.max(wait, new_tok - now - tok_tau)
  end
  -- Fair shares: each dimension's share of the caller, at its fraction of the bucket.
  local shares, share_wait, uncapped, window = {}, 0, true, 0
  if ARGV[9] then
    window = num(ARGV[9])
    local dims = num(ARGV[10])
    for _, v in ipairs({window, dims}) do
      if type(v) == 'table' then return v end
    end
    local limit_rpm = req_t > 0 and 60000000 / req_t or 0
    local i = 11
    for _ = 1, dims do
      local prefix, own, m = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
      if not prefix or not own or not m or m < 1 then
        return redis.error_reply('ERR llm_limit: malformed shares')
      end
      i = i + 3
      local names, w, lo, hi, fields = {}, {}, {}, {}, {}
      for j = 1, m do
        names[j] = ARGV[i]
        w[j], lo[j], hi[j] = tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
        if not names[j] or not w[j] or w[j] <= 0 or not lo[j] or not hi[j] then
          return redis.error_reply('ERR llm_limit: malformed share ' .. tostring(names[j]))
        end
        fields[j] = prefix .. ':' .. names[j] .. ':seen'
        i = i + 4
      end
      local seen = redis.call('HMGET', KEYS[1], unpack(fields))
      local act, own_j = {}, nil
      for j = 1, m do
        if names[j] == own then
          own_j = j
          act[#act + 1] = j
        elseif tonumber(seen[j] or '0') > now - window then
          act[#act + 1] = j
        end
      end
      if not own_j then
        return redis.error_reply('ERR llm_limit: share ' .. tostring(own) .. ' not listed')
      end
      local phi = fair_fraction(act, own_j, w, lo, hi, limit_rpm)
      local p = prefix .. ':' .. own
      local st = redis.call('HMGET', KEYS[1], p .. ':rt', p .. ':tt')
      -- The sub-bucket holds phi of the bucket's burst (its tolerance in time is the
      -- bucket's), but at least one request and the call's reservation.
      local sh = {p = p, seen = tonumber(seen[own_j] or '0'),
        ri = req_t / phi, ti = tok_t / phi,
        rt = tonumber(st[1] or '0'), tt = tonumber(st[2] or '0')}
      sh.rtau = math.max(req_tau, sh.ri)
      sh.ttau = math.max(tok_tau, tokens * sh.ti)
      if req_t > 0 then
        share_wait = math.max(share_wait, math.max(sh.rt, now) + sh.ri - sh.rtau - now)
      end
      if tok_t > 0 then
        share_wait = math.max(share_wait, math.max(sh.tt, now) + tokens * sh.ti - sh.ttau - now)
      end
      if hi[own_j] > 0 then uncapped = false end
      shares[#shares + 1] = sh
    end
  end
  -- Asking makes a share active for the window (a booked call: from its slot on).
  local function mark_seen(at)
    for _, sh in ipairs(shares) do
      if at > sh.seen then
        redis.call('HSET', KEYS[1], sh.p .. ':seen', fmt(at))
      end
    end
    if #shares > 0 then keep_until(at + window) end
  end
  if wait > max_wait then
    mark_seen(now)
    return {0, math.ceil(wait), 'rate'}
  end
  if share_wait > wait then
    -- Past its fair rate at the bucket's next slot. Booked at its share's slot when that
    -- lies within what the bucket has booked already (charged as the next slot, so no
    -- window sees more than the bucket allows and no capacity is skipped); else only a
    -- full bucket with nothing booked (capacity being lost) admits it all the same, and
    -- never a capped share; else it asks again later.
    local req_old, tok_old = tonumber(state[1] or '0'), tonumber(state[2] or '0')
    local at = now + share_wait
    if share_wait <= max_wait and (req_t <= 0 or at <= req_old)
        and (tok_t <= 0 or at <= tok_old) then
      wait = share_wait
    elseif not (uncapped and req_old <= now and tok_old <= now) then
      mark_seen(now)
      local hint = share_wait
      if uncapped then
        hint = math.min(hint, math.max(req_old, tok_old) - now)
      end
      return {0, math.max(1, math.ceil(hint)), 'share'}
    end
  end
  local horizon = now
  if new_req then
    redis.call('HSET', KEYS[1], 'req_tat', fmt(new_req))
    horizon = math.max(horizon, new_req)
  end
  if new_tok then
    redis.call('HSET', KEYS[1], 'tok_tat', fmt(new_tok))
    horizon = math.max(horizon, new_tok)
  end
  if #shares > 0 then
    -- Charged as arrivals at the booked slot; the debt never exceeds one burst.
    local at = now + wait
    for _, sh in ipairs(shares) do
      local f = {sh.p .. ':ri', fmt(sh.ri), sh.p .. ':ti', fmt(sh.ti)}
      if req_t > 0 then
        local rt = math.min(math.max(sh.rt, at) + sh.ri, at + sh.rtau)
        table.insert(f, sh.p .. ':rt')
        table.insert(f, fmt(rt))
        horizon = math.max(horizon, rt)
      end
      if tok_t > 0 then
        local tt = math.min(math.max(sh.tt, at) + tokens * sh.ti, at + sh.ttau)
        table.insert(f, sh.p .. ':tt')
        table.insert(f, fmt(tt))
        horizon = math.max(horizon, tt)
      end
      redis.call('HSET', KEYS[1], unpack(f))
    end
    mark_seen(at)
    keep_until(horizon)
  elseif new_req or new_tok then
    -- Once every tat is in the past the state means "full bucket" = no key at all.
    redis.call('PEXPIRE', KEYS[1], math.ceil((horizon - now) / 1000) + 1000)
  end
  if half then
    local lease = num(ARGV[8])
    if type(lease) == 'table' then return lease end
    local probe_until = now + wait + lease
    redis.call('HSET', brk, 'probe_until', fmt(probe_until))
    if redis.call('PTTL', brk) < math.ceil((probe_until - now) / 1000) + 1000 then
      redis.call('PEXPIRE', brk, math.ceil((probe_until - now) / 1000) + 1000)
    end
    return {1, math.ceil(wait), 'probe'}
  end
  return {1, math.ceil(wait), failing and 'failing' or 'ok'}
elseif mode == 'settle' then
  local args = {num(ARGV[2]), num(ARGV[3]), num(ARGV[4]), num(ARGV[5])}
  for _, v in ipairs(args) do
    if type(v) == 'table' then return v end
  end
  adjust('req_tat', args[1], args[2])
  adjust('tok_tat', args[3], args[4])
  refund_shares(6, args[2], args[4])
  return {1, 0, 'ok'}
elseif mode == 'confirm' then
  local args = {num(ARGV[2]), num(ARGV[3]), num(ARGV[4])}
  for _, v in ipairs(args) do
    if type(v) == 'table' then return v end
  end
  local paused = tonumber(redis.call('GET', KEYS[2]) or '0')
  if paused <= now then
    return {1, 0, 'ok'}
  end
  -- Paused while the caller waited for its booked slot: give the slot back.
  adjust('req_tat', args[1], -1)
  adjust('tok_tat', args[2], -args[3])
  refund_shares(5, args[1] > 0 and -1 or 0, args[2] > 0 and -args[3] or 0)
  return {0, math.ceil(paused - now), 'paused'}
elseif mode == 'pause' then
  local ms = num(ARGV[2])
  if type(ms) == 'table' then return ms end
  if ms <= 0 then return redis.error_reply('ERR llm_limit: pause must be positive') end
  local until_us = now + ms * 1000
  local existing = tonumber(redis.call('GET', KEYS[2]) or '0')
  if existing > until_us then
    until_us = existing
  end
  redis.call('SET', KEYS[2], fmt(until_us), 'PX', math.ceil((until_us - now) / 1000) + 1)
  return {1, math.ceil(until_us - now), 'paused'}
elseif mode == 'breaker' then
  local brk, outcome = KEYS[3], ARGV[2]
  if not brk then return redis.error_reply('ERR llm_limit: breaker needs its key') end
  if outcome == 'success' then
    redis.call('DEL', brk)
    return {1, 0, 'closed'}
  elseif outcome == 'abandon' then
    redis.call('HDEL', brk, 'probe_until')
    return {1, 0, 'ok'}
  elseif outcome ~= 'failure' then
    return redis.error_reply('ERR llm_limit: unknown breaker outcome ' .. tostring(outcome))
  end
  local threshold, open_ms = num(ARGV[3]), num(ARGV[4])
  for _, v in ipairs({threshold, open_ms}) do
    if type(v) == 'table' then return v end
  end
  local open_until = tonumber(redis.call('HGET', brk, 'open_until') or '0')
  if open_until > now then
    -- Already open: a call admitted before it opened failed late.
    return {1, math.ceil(open_until - now), 'open'}
  end
  -- The probe failed, or a call failed while half-open: open again.
  local reopen = ARGV[5] == '1' or open_until > 0
  if not reopen then
    local fails = redis.call('HINCRBY', brk, 'fails', 1)
    -- The count of a breaker that never opens goes after a quiet spell.
    redis.call('PEXPIRE', brk, math.max(open_ms * 2, 600000))
    if fails < threshold then
      return {1, 0, 'counted'}
    end
  end
  local until_us = now + open_ms * 1000
  redis.call('DEL', brk)
  redis.call('HSET', brk, 'open_until', fmt(until_us))
  -- Outlives the open spell so the half-open state is seen; bounded all the same.
  redis.call('PEXPIRE', brk, open_ms * 2 + 60000)
  return {1, open_ms * 1000, 'opened'}
else
  return redis.error_reply('ERR llm_limit: unknown mode ' .. tostring(mode))
end
