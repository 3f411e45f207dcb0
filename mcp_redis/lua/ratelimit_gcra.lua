-- GCRA (a token bucket of `limit` tokens refilled over `window`), all limits
-- at once. Refill is exact: state is the theoretical arrival time (TAT).
-- KEYS[i]: one integer per limit: the TAT in quarter microseconds (a double
--          near today's clock in us is a multiple of 1/4: exact, and Redis
--          keeps the value as a bare integer, no string).
-- ARGV: cost (negative: peek, consume nothing), then limit_i, window_us_i for
--       each key, then optionally the time in us (tests simulate a clock).
-- Reply: "allowed refused-index(0 = none)" then, per limit,
--        " remaining retry_after_us reset_after_us" (integers, one string);
--        one limit admitted: the integer reset_after_us * (limit + 1) + remaining.
local cost = tonumber(ARGV[1])
local consume = cost > 0
if not consume then cost = -cost end
local now = tonumber(ARGV[2 + 2 * #KEYS])
if not now then
  local t = redis.call('TIME')
  now = t[1] * 1000000 + t[2]
end

local n = #KEYS
if n == 1 and consume then
  -- The common call, inline: one limit, admitted.
  local limit, window = tonumber(ARGV[2]), tonumber(ARGV[3])
  local interval = window / limit
  local eps = math.min(1, interval / 2)
  local v = redis.call('GET', KEYS[1])
  local tat = v and tonumber(v) / 4 or now
  if tat < now then tat = now end
  local new = tat + cost * interval
  if not (new - window > now + eps) then
    redis.call('SET', KEYS[1], string.format('%.0f', new * 4), 'PX', math.max(1, math.ceil((new - now) / 1000)))
    -- An integer reply, no text to format: reset_after_us * (limit + 1) + remaining.
    local remaining, reset = math.floor((now + window - new + eps) / interval), math.ceil(new - now)
    local v = reset * (limit + 1) + remaining
    if v < 9e15 then return v end
    return string.format('1 0 %d 0 %d', remaining, reset)
  end
end
local news = {}
local out = {'1', 0}
local refused, worst = 0, -1
for i = 1, n do
  local limit = tonumber(ARGV[2 * i])
  local window = tonumber(ARGV[2 * i + 1])
  local interval = window / limit
  -- Tolerate float rounding so a full burst fits.
  local eps = math.min(1, interval / 2)
  local v = redis.call('GET', KEYS[i])
  local tat = v and tonumber(v) / 4 or now
  if tat < now then tat = now end
  local new = tat + cost * interval
  news[i] = new
  local retry = 0
  if new - window > now + eps then
    retry = math.max(1, math.ceil(new - window - now))
    if retry > worst then worst, refused = retry, i end
  end
  out[3 * i] = math.floor((now + window - tat + eps) / interval)
  out[3 * i + 1] = retry
  out[3 * i + 2] = math.ceil(tat - now)
end

if refused > 0 then
  out[1], out[2] = '0', refused
elseif consume then
  for i = 1, n do
    local limit = tonumber(ARGV[2 * i])
    local window = tonumber(ARGV[2 * i + 1])
    local interval = window / limit
    local eps = math.min(1, interval / 2)
    redis.call('SET', KEYS[i], string.format('%.0f', news[i] * 4), 'PX', math.max(1, math.ceil((news[i] - now) / 1000)))
    out[3 * i] = math.floor((now + window - news[i] + eps) / interval)
    out[3 * i + 2] = math.ceil(news[i] - now)
  end
end
-- One bulk string, not an array: a client without hiredis parses it in one read.
-- %d, not Lua's own %.14g: slower, and inexact from 1e14 (windows reach 3e14 us).
for j = 2, #out do
  local v = out[j]
  if v == 0 then out[j] = '0' else out[j] = string.format('%d', v) end
end
return table.concat(out, ' ')
