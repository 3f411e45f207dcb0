-- Exact sliding window (a log of hits), all limits of one call at once.
-- KEYS[i]: one sorted set per limit; each admitted unit of cost is a member
--          whose score and name are the same integer microsecond stamp,
--          strictly increasing per key (so members never collide).
-- ARGV: consume (1 = hit, 0 = peek), cost, now override in us (-1 = TIME),
--       then limit_i, window_us_i for each key.
-- Reply: {allowed, refused index (0 = none), then per limit:
--         remaining, retry_after_us, reset_after_us}.
local consume = ARGV[1] == '1'
local cost = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
if now < 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function us(x) return string.format('%.0f', x) end

local n = #KEYS
local counts, newest = {}, {}
local out = {1, 0}
local refused, worst = 0, -1
for i = 1, n do
  local key = KEYS[i]
  local limit = tonumber(ARGV[2 + 2 * i])
  local window = tonumber(ARGV[3 + 2 * i])
  local floor_ = '(' .. us(now - window)
  local count
  if consume then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', us(now - window))
    count = redis.call('ZCARD', key)
  else
    count = redis.call('ZCOUNT', key, floor_, '+inf')
  end
  local last = 0
  if count > 0 then
    last = tonumber(redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')[2])
  end
  counts[i], newest[i] = count, last
  local retry, reset = 0, 0
  if count > 0 then reset = last + window - now end
  if count + cost > limit then
    -- The hit fits once the (count + cost - limit)-th oldest live entry leaves.
    local e = redis.call('ZRANGEBYSCORE', key, floor_, '+inf', 'WITHSCORES', 'LIMIT', count + cost - limit - 1, 1)
    retry = tonumber(e[2]) + window - now
    if retry > worst then worst, refused = retry, i end
  end
  out[3 * i], out[3 * i + 1], out[3 * i + 2] = limit - count, retry, reset
end

if refused > 0 then
  out[1], out[2] = 0, refused
elseif consume then
  for i = 1, n do
    local key = KEYS[i]
    local window = tonumber(ARGV[3 + 2 * i])
    local stamp = math.max(now, newest[i] + 1)
    local args, added = {}, 0
    for j = 0, cost - 1 do
      local m = us(stamp + j)
      args[#args + 1] = m
      args[#args + 1] = m
      added = added + 1
      if added == 500 or j == cost - 1 then
        redis.call('ZADD', key, unpack(args))
        args, added = {}, 0
      end
    end
    local last = stamp + cost - 1
    redis.call('PEXPIRE', key, math.max(1, math.ceil((last + window - now) / 1000)))
    out[3 * i] = out[3 * i] - cost
    out[3 * i + 2] = last + window - now
  end
end
return out
