-- Exact sliding window (a log of hits), all limits of one call at once.
-- KEYS[i]: one sorted set per limit; each admitted unit of cost is a member
--          scored by the server time in microseconds and named
--          "<time>:<nonce>:<unit>" (the nonce is unique per caller and call,
--          so members never collide, even within one microsecond).
-- ARGV: cost (negative: peek, consume nothing), then limit_i, window_us_i for
--       each key, then the nonce, then optionally the time in us (tests simulate a clock).
-- Reply: "allowed refused-index(0 = none)" then, per limit,
--        " remaining retry_after_us reset_after_us" (integers, one string).
local cost = tonumber(ARGV[1])
local consume = cost > 0
if not consume then cost = -cost end
local now = tonumber(ARGV[3 + 2 * #KEYS])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function us(x) return string.format('%.0f', x) end

local n = #KEYS
local nonce = ARGV[2 + 2 * n]
local counts = {}
local out = {1, 0}
local refused, worst = 0, -1
for i = 1, n do
  local key = KEYS[i]
  local limit = tonumber(ARGV[2 * i])
  local window = tonumber(ARGV[2 * i + 1])
  local floor_ = '(' .. us(now - window)
  local count
  if consume then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', us(now - window))
    count = redis.call('ZCARD', key)
  else
    count = redis.call('ZCOUNT', key, floor_, '+inf')
  end
  counts[i] = count
  local retry, reset = 0, 0
  if count > 0 and (count + cost > limit or not consume) then
    -- Admitted hits skip this: their own entry is the newest.
    reset = tonumber(redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')[2]) + window - now
  end
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
  for i = 1, n do
    if consume and counts[i] > 0 and counts[i] + cost <= tonumber(ARGV[2 * i]) then
      out[3 * i + 2] = tonumber(redis.call('ZRANGE', KEYS[i], -1, -1, 'WITHSCORES')[2])
                       + tonumber(ARGV[2 * i + 1]) - now
    end
  end
elseif consume then
  for i = 1, n do
    local key = KEYS[i]
    local window = tonumber(ARGV[2 * i + 1])
    local stamp = us(now)
    local prefix = stamp .. ':' .. nonce .. ':'
    local args, added = {}, 0
    for j = 1, cost do
      args[#args + 1] = stamp
      args[#args + 1] = prefix .. j
      added = added + 1
      if added == 500 or j == cost then
        redis.call('ZADD', key, unpack(args))
        args, added = {}, 0
      end
    end
    redis.call('PEXPIRE', key, math.max(1, math.ceil(window / 1000)))
    out[3 * i] = out[3 * i] - cost
    out[3 * i + 2] = window
  end
end
-- One bulk string, not an array: a client without hiredis parses it in one read.
for j = 1, #out do out[j] = string.format('%d', out[j]) end
return table.concat(out, ' ')
