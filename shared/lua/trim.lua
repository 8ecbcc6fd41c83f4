-- trim: remove acknowledged entries from the front of a stream read through consumer
-- groups (submissions, jobs, events). Scripts acknowledge without deleting; this removes
-- them in bulk. Redis trimming ignores the PEL, so the bound is computed here, atomically
-- with the trim: the smallest of every group's oldest pending id and last-delivered id.
-- Every entry below it was delivered to every group and acknowledged by each, so no
-- pending or undelivered entry is ever removed. Approximate (`~`) trimming removes only
-- whole stream nodes whose last entry is below the bound, so it never trims past it, and
-- LIMIT bounds the work of one call.
-- KEYS[1] the stream
-- ARGV[1] at most this many entries removed in this call
-- Returns {removed, bound or false (nothing may be trimmed: no stream or no group)}

-- Stream ids `ms-seq` compared exactly (decimal strings without leading zeros).
local function num_lt(a, b)
  if #a ~= #b then
    return #a < #b
  end
  return a < b
end
local function id_lt(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  if not am or not bm then
    error('trim: bad stream id ' .. tostring(a) .. ' / ' .. tostring(b))
  end
  if am ~= bm then
    return num_lt(am, bm)
  end
  return num_lt(as, bs)
end

local stream = KEYS[1]
if redis.call('EXISTS', stream) == 0 then
  return {0, false}
end
local groups = redis.call('XINFO', 'GROUPS', stream)
if #groups == 0 then
  return {0, false}
end
local bound
for _, g in ipairs(groups) do
  local name, last, pending
  for i = 1, #g, 2 do
    local f = g[i]
    if f == 'name' then
      name = g[i + 1]
    elseif f == 'last-delivered-id' then
      last = g[i + 1]
    elseif f == 'pending' then
      pending = tonumber(g[i + 1])
    end
  end
  if not name or not last or not pending then
    return {0, false}
  end
  local b = last
  if pending > 0 then
    local p = redis.call('XPENDING', stream, name)
    if p[2] and id_lt(p[2], b) then
      b = p[2]
    end
  end
  if not bound or id_lt(b, bound) then
    bound = b
  end
end
local removed = redis.call('XTRIM', stream, 'MINID', '~', bound, 'LIMIT', tonumber(ARGV[1]))
return {removed, bound}
